"""What builds a run from the floors below (rotnet/, then pipelines/ and models/): the config resolved
once (`launch.resolve`), then the model, DDP, optimizer and schedule (`launch.run`)."""
