"""Give ImageNet's official val (50,000 JPEGs in one folder, labels apart) the labels it lacks.

LABELS is LOC_val_solution.csv (Kaggle; PredictionString starts with the wnid) or the devkit's
ILSVRC2012_validation_ground_truth.txt, whose IDs follow meta.mat's order, NOT sorted wnids:
--synsets MAP gives ID -> wnid: map_clsloc.txt (`n02119789 1 kit_fox`), or wnids in ID order by
  python -c "import scipy.io as s; [print(x[0][1][0], x[0][0][0][0]) for x in
             s.loadmat('meta.mat')['synsets'] if x[0][0][0][0] <= 1000]" > map.txt
(needs scipy). A sorted list (synsets.txt, LOC_synset_mapping.txt: torchvision's order) is refused.
Any unmatched image, label or wnid: one line naming file and line, nothing written. See
docs/pipelines.md ("ImageNet's official val").
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

from pipelines import listing
from pipelines.listing import class_folders, is_image_file, list_images, split_layout, write_file_list
from rotnet.cli import ArgumentParser, InputError, one_line_errors

MANIFEST = ".imagenet_val.json"   # hidden: the loaders skip it
CSV_HEADER = "imageid,predictionstring"


class ConversionError(InputError):
    """Labels and images do not match; the message names the file and line."""


def _lines(path: str) -> list[str]:
    """The text lines of `path`, trailing blank lines dropped; refuses binary files (meta.mat)."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = f.read().splitlines()
    except OSError as e:   # missing, a folder, no permission
        raise ConversionError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConversionError(f"{path} is not a text file (meta.mat? see `python -m pipelines.imagenet_val "
                              "--help` for the one-line conversion to text)") from None
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ConversionError(f"{path} is empty")
    return lines


def read_synsets(path: str) -> dict[int, tuple[str, str]]:
    """{ILSVRC2012_ID: (wnid, 'path:line')} from map_clsloc.txt lines or a wnid list in ID order."""
    by_id: dict[int, tuple[str, str]] = {}
    explicit = None
    for n, line in enumerate(_lines(path), 1):
        tok = line.split()
        if not tok:
            raise ConversionError(f"{path}:{n}: blank line (line i is ID i: no gaps)")
        has_id = len(tok) > 1 and tok[1].isdigit()
        if explicit is None:
            explicit = has_id
        if has_id != explicit:
            raise ConversionError(f"{path}:{n}: {line!r} mixes 'wnid ID name' and 'wnid words' lines")
        ident = int(tok[1]) if has_id else n
        if ident in by_id:
            raise ConversionError(f"{path}:{n}: ID {ident} again (first at {by_id[ident][1]})")
        by_id[ident] = (tok[0], f"{path}:{n}")
    if sorted(by_id) != list(range(1, len(by_id) + 1)):
        raise ConversionError(f"{path}: the IDs are not 1..{len(by_id)} (ILSVRC2012_IDs start at 1)")
    wnids = [by_id[i][0] for i in sorted(by_id)]
    if len(set(wnids)) != len(wnids):
        raise ConversionError(f"{path}: a wnid appears twice")
    if len(wnids) > 1 and wnids == sorted(wnids):
        raise ConversionError(f"{path} lists the wnids in sorted order (like LOC_synset_mapping.txt): "
                              "torchvision's class order, not the devkit's ILSVRC2012_ID order; give "
                              "map_clsloc.txt or the list made from meta.mat (see --help)")
    return by_id


def read_labels(path: str, synsets: str) -> dict[str, tuple[str, str]]:
    """{image name without extension: (wnid, 'path:line')} from either label format (module doc)."""
    lines = _lines(path)
    head = lines[0].strip()
    labels: dict[str, tuple[str, str]] = {}

    def add(n: int, stem: str, wnid: str) -> None:
        if stem in labels:
            raise ConversionError(f"{path}:{n}: {stem} again (first at {labels[stem][1]})")
        labels[stem] = (wnid, f"{path}:{n}")

    if head.replace(" ", "").lower().startswith(CSV_HEADER):                # LOC_val_solution.csv
        for n, line in enumerate(lines[1:], 2):
            if not line.strip():
                continue
            image, comma, prediction = line.partition(",")
            if not comma or not prediction.split():
                raise ConversionError(f"{path}:{n}: expected 'ImageId,PredictionString', got {line!r}")
            stem = image.strip()
            add(n, os.path.splitext(stem)[0] if is_image_file(stem) else stem, prediction.split()[0])
    elif head.isdigit():                                                     # devkit ground truth
        if not synsets:
            raise ConversionError(f"{path} holds ILSVRC2012_IDs (devkit ground truth): give --synsets, "
                                  "the ID -> wnid map (map_clsloc.txt, or the list made from meta.mat)")
        by_id = read_synsets(synsets)
        for n, line in enumerate(lines, 1):
            if not line.strip().isdigit() or int(line) not in by_id:
                raise ConversionError(f"{path}:{n}: expected an ILSVRC2012_ID in 1..{len(by_id)} "
                                      f"({synsets} has {len(by_id)} synsets), got {line!r}")
            add(n, f"ILSVRC2012_val_{n:08d}", by_id[int(line)][0])
    else:
        raise ConversionError(f"{path}:1: expected the header 'ImageId,PredictionString' (LOC_val_solution"
                              f".csv) or an ILSVRC2012_ID (validation_ground_truth.txt), got {head!r}")
    return labels


def val_images(val_dir: str) -> dict[str, str]:
    """{name without extension: file name} of the flat split `val_dir`."""
    layout = split_layout(val_dir)
    if layout == listing.CLASSES:
        raise ConversionError(f"{val_dir!r} already has class folders: set data.val_dir to it as it is")
    if layout != listing.FLAT:
        raise listing.layout_error(val_dir, layout)
    images: dict[str, str] = {}
    for name in sorted(os.listdir(val_dir)):
        if is_image_file(name):
            stem = os.path.splitext(name)[0]
            if stem in images:
                raise ConversionError(f"{val_dir!r} holds both {images[stem]} and {name}: which is labelled?")
            images[stem] = name
    return images


def _refuse(problems: list[str]) -> None:
    if problems:
        more = f" (and {len(problems) - 1} more like it)" if len(problems) > 1 else ""
        raise ConversionError(problems[0] + more)


def match(images: dict[str, str], labels: dict[str, tuple[str, str]], classes: list[str], *, val_dir: str,
          labels_path: str, train_dir: str, subset: bool = False) -> list[tuple[str, int]]:
    """[(image file name, class index)] in name order; ConversionError at the first mismatch. subset:
    skip images of classes TRAIN_DIR lacks, but every TRAIN_DIR class needs some (no silent empty)."""
    counts = f"{len(labels)} labels, {len(images)} images"
    _refuse([f"{where}: a label for {stem}, but {val_dir} has no such image ({counts})"
             for stem, (_, where) in labels.items() if stem not in images])
    _refuse([f"{os.path.join(val_dir, name)} has no label in {labels_path} ({counts})"
             for stem, name in images.items() if stem not in labels])
    index = {c: i for i, c in enumerate(classes)}
    if subset:
        seen = {wnid for wnid, _ in labels.values()}
        _refuse([f"--subset: class folder {c} of {train_dir} has no image in {labels_path} (is TRAIN_DIR "
                 f"a subset of these labels' {len(seen)} classes?)" for c in classes if c not in seen])
        images = {stem: name for stem, name in images.items() if labels[stem][0] in index}
    else:
        _refuse([f"{where}: {wnid} (label of {stem}) is not a class folder of {train_dir} ({len(classes)} "
                 f"classes, {classes[0]} ... {classes[-1]}; --subset keeps only its classes)"
                 for stem, (wnid, where) in labels.items() if wnid not in index])
    return [(name, index[labels[stem][0]]) for stem, name in images.items()]


def _inside(a: str, b: str) -> bool:
    """`a` is `b` or lies under it."""
    return os.path.commonpath([a, b]) == b


def check_out(out: str, force: bool, sources: tuple[str, ...]) -> None:
    """Refuse an OUT that would overwrite the sources or a folder this command did not write."""
    for src in sources:
        if _inside(out, src) or _inside(src, out):
            raise ConversionError(f"--out {out} overlaps {src}: write the output beside the dataset's splits")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConversionError(f"--out {out} is a file")
    if os.path.isdir(out) and os.listdir(out):
        if not os.path.isfile(os.path.join(out, MANIFEST)):
            raise ConversionError(f"--out {out} is not empty and not written by this command: choose another")
        if not force:
            raise ConversionError(f"--out {out} holds an earlier conversion ({MANIFEST}): pass --force")


def write_out(out: str, fill, manifest: dict) -> None:
    """Build OUT in a hidden sibling with `fill(folder)`, then swap it in: a failure changes nothing."""
    parent, name = os.path.split(out)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent)
    except OSError as e:   # a read-only parent, a file in the way
        raise ConversionError(f"--out {out}: cannot write in {parent} ({e.strerror or e})") from None
    old = os.path.join(parent, f".{name}.old-{os.getpid()}")
    moved = False
    try:
        fill(tmp)
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
        if os.path.isdir(out):
            os.rename(out, old)
            moved = True
        os.rename(tmp, out)
    except BaseException as e:
        if moved:
            os.rename(old, out)
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):   # e.g. a filesystem without symlinks, or a full disk
            raise ConversionError(f"--out {out}: writing failed, nothing changed ({e.strerror or e}); "
                                  "without symlinks use --mode list") from e
        raise
    if moved:
        shutil.rmtree(old)


def symlink_tree(folder: str, out: str, val_dir: str, classes: list[str], pairs: list[tuple]) -> None:
    """folder/<wnid>/<image> links; relative to where they will live (OUT), not to `folder`."""
    for c in classes:
        os.makedirs(os.path.join(folder, c))
    for name, idx in pairs:
        target = os.path.relpath(os.path.join(val_dir, name), os.path.join(out, classes[idx]))
        os.symlink(target, os.path.join(folder, classes[idx], name))


def file_lists(folder: str, val_dir: str, train_dir: str, pairs: list[tuple[str, int]]) -> None:
    """folder/<val name>.txt and folder/<train name>.txt, for data.file_list=OUT/{split}.txt."""
    write_file_list(os.path.join(folder, os.path.basename(val_dir) + ".txt"), [n for n, _ in pairs],
                    [i for _, i in pairs])
    paths, labels, _ = list_images(train_dir)
    write_file_list(os.path.join(folder, os.path.basename(train_dir) + ".txt"),
                    [os.path.relpath(p, train_dir) for p in paths], labels)


def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m pipelines.imagenet_val", description=__doc__)
    ap.add_argument("val_dir", metavar="VAL_DIR", help="the flat folder ILSVRC2012_img_val.tar extracts to")
    ap.add_argument("--labels", required=True,
                    help="LOC_val_solution.csv, or ILSVRC2012_validation_ground_truth.txt with --synsets")
    ap.add_argument("--synsets", default="", help="the devkit's ID -> wnid map: map_clsloc.txt or a wnid "
                    "list in ID order (NOT the sorted synsets.txt / LOC_synset_mapping.txt)")
    ap.add_argument("--train-dir", required=True,
                    help="the train split (TRAIN_DIR/<wnid>/...): its sorted folders number the classes")
    ap.add_argument("--out", required=True,
                    help="symlink: the new split folder (e.g. ROOT/val_classes; data.val_dir=val_classes); "
                         "list: the folder of the two lists (then data.file_list=OUT/{split}.txt)")
    ap.add_argument("--mode", choices=("symlink", "list"), default="symlink",
                    help="symlink (default): a class-folder tree of links, read by every backend. "
                         "list: file lists, for filesystems without symlinks")
    ap.add_argument("--force", action="store_true", help="replace an earlier output of this command at --out")
    ap.add_argument("--subset", action="store_true",
                    help="TRAIN_DIR holds a class subset (e.g. ImageNet-100): skip val images of other "
                         "classes (without it, a label outside TRAIN_DIR is an error)")
    args = ap.parse_intermixed_args(argv)
    val_dir, train_dir, out = (os.path.abspath(p) for p in (args.val_dir, args.train_dir, args.out))
    with one_line_errors(InputError):
        check_out(out, args.force, (val_dir, train_dir))
        if args.mode == "list" and os.path.basename(val_dir) == os.path.basename(train_dir):
            raise ConversionError(f"{val_dir} and {train_dir} have the same name: their lists would collide")
        classes = class_folders(train_dir)
        images = val_images(val_dir)
        pairs = match(images, read_labels(args.labels, args.synsets), classes, val_dir=val_dir,
                      labels_path=args.labels, train_dir=train_dir, subset=args.subset)
        manifest = {"val_dir": val_dir, "labels": os.path.abspath(args.labels), "train_dir": train_dir,
                    "synsets": os.path.abspath(args.synsets) if args.synsets else "", "mode": args.mode,
                    "subset": args.subset, "images": len(pairs), "classes": len(classes)}
        if args.mode == "symlink":
            write_out(out, lambda f: symlink_tree(f, out, val_dir, classes, pairs), manifest)
        else:
            write_out(out, lambda f: file_lists(f, val_dir, train_dir, pairs), manifest)
    used = len({idx for _, idx in pairs})
    skipped = f" ({len(images) - len(pairs)} images of other classes skipped)" if args.subset else ""
    print(f"{len(pairs)} images of {used}/{len(classes)} classes -> {out}{skipped}")
    root = os.path.dirname(train_dir)
    where = os.path.relpath(out, root) if _inside(out, root) else out
    key = f"data.val_dir={where}" if args.mode == "symlink" else f"data.file_list={out}/{{split}}.txt"
    print(f"next: set {key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
