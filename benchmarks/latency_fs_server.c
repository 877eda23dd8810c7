/* The server of benchmarks/latency_fs.py: SRC mounted read-only at MOUNT, every open, read, getattr
 * (lookup) and readdir answered after a set latency, reads sharing one link of capped bandwidth.
 * What it models and why: latency_fs.py's docstring. Built by benchmarks/setup_storage.sh:
 *
 *   gcc -O2 -Wall latency_fs_server.c $(pkg-config --cflags --libs fuse3) -o latency-fs-server
 *   latency-fs-server SRC MOUNT LATENCY_MS BANDWIDTH_MBPS ATTR_TIMEOUT_S THREADS PARENT_PID
 *
 * In C, not Python: the model's own CPU must stay small, because it shares the machine's cores with
 * the readers it measures, while a cluster's file server has cores of its own. A Python server cost
 * six times as much CPU per file, in callbacks and in handing its GIL between 64 threads.
 * PARENT_PID (0: none): when that process is gone, the server unmounts and exits.
 */
#define FUSE_USE_VERSION 31
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <fuse.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static char src[PATH_MAX], mount_point[PATH_MAX];
static double latency_s, bytes_per_s, attr_timeout_s;
static pid_t parent;
static double link_free_at;   /* when the link has sent the bytes of every read so far */
static pthread_mutex_t link_lock = PTHREAD_MUTEX_INITIALIZER;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* Answer after the latency; a read's bytes first queue on the link behind earlier reads' bytes.
 * The latency is paid once per request, in parallel with other requests (one thread each). */
static void wait_link(size_t nbytes) {
    double start = now(), done = start + latency_s;
    if (bytes_per_s > 0) {
        pthread_mutex_lock(&link_lock);
        link_free_at = (link_free_at > start ? link_free_at : start) + nbytes / bytes_per_s;
        done = link_free_at + latency_s;
        pthread_mutex_unlock(&link_lock);
    }
    if (done <= start)
        return;
    struct timespec t = {(time_t)done, (long)((done - (time_t)done) * 1e9)};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &t, NULL) == EINTR) {
    }
}

static void full_path(char *out, const char *path) { snprintf(out, PATH_MAX, "%s%s", src, path); }

static void *lfs_init(struct fuse_conn_info *conn, struct fuse_config *cfg) {
    (void)conn;
    cfg->entry_timeout = cfg->attr_timeout = cfg->negative_timeout = attr_timeout_s;
    cfg->direct_io = 1;      /* no page cache for file data: every read reaches the server */
    return NULL;
}

static int lfs_getattr(const char *path, struct stat *st, struct fuse_file_info *fi) {
    wait_link(0);
    char p[PATH_MAX];
    full_path(p, path);
    return (fi ? fstat(fi->fh, st) : lstat(p, st)) == 0 ? 0 : -errno;
}

static int lfs_readlink(const char *path, char *buf, size_t size) {
    wait_link(0);
    char p[PATH_MAX];
    full_path(p, path);
    ssize_t n = readlink(p, buf, size - 1);
    if (n < 0)
        return -errno;
    buf[n] = '\0';
    return 0;
}

static int lfs_readdir(const char *path, void *buf, fuse_fill_dir_t fill, off_t offset,
                       struct fuse_file_info *fi, enum fuse_readdir_flags flags) {
    (void)offset, (void)fi, (void)flags;
    wait_link(0);
    char p[PATH_MAX];
    full_path(p, path);
    DIR *d = opendir(p);
    if (!d)
        return -errno;
    for (struct dirent *e; (e = readdir(d));)
        if (fill(buf, e->d_name, NULL, 0, 0))
            break;
    closedir(d);
    return 0;
}

static int lfs_open(const char *path, struct fuse_file_info *fi) {
    if ((fi->flags & O_ACCMODE) != O_RDONLY || fi->flags & (O_TRUNC | O_APPEND))
        return -EROFS;
    wait_link(0);
    char p[PATH_MAX];
    full_path(p, path);
    int fd = open(p, O_RDONLY);
    if (fd < 0)
        return -errno;
    fi->fh = fd;
    return 0;
}

static int lfs_read(const char *path, char *buf, size_t size, off_t off, struct fuse_file_info *fi) {
    (void)path;
    ssize_t n = pread(fi->fh, buf, size, off);
    if (n < 0)
        return -errno;
    wait_link(n);
    return n;
}

static int lfs_release(const char *path, struct fuse_file_info *fi) {
    (void)path;
    close(fi->fh);
    return 0;
}

static int lfs_statfs(const char *path, struct statvfs *st) {
    (void)path;
    return statvfs(src, st) == 0 ? 0 : -errno;
}

static const struct fuse_operations ops = {
    .init = lfs_init, .getattr = lfs_getattr, .readlink = lfs_readlink, .readdir = lfs_readdir,
    .open = lfs_open, .read = lfs_read, .release = lfs_release, .statfs = lfs_statfs,
};

/* A parent that died (even by SIGKILL) leaves no mount behind: unmount lazily, which ends the loop. */
static void *watch_parent(void *arg) {
    (void)arg;
    while (getppid() == parent)
        sleep(1);
    pid_t child = fork();
    if (child == 0) {
        execlp("fusermount3", "fusermount3", "-uz", mount_point, (char *)NULL);
        _exit(127);
    }
    if (child > 0)
        waitpid(child, NULL, 0);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 8) {
        fprintf(stderr, "usage: %s SRC MOUNT LATENCY_MS BANDWIDTH_MBPS ATTR_TIMEOUT_S THREADS PARENT_PID\n",
                argv[0]);
        return 2;
    }
    if (!realpath(argv[1], src)) {
        perror(argv[1]);
        return 2;
    }
    snprintf(mount_point, sizeof mount_point, "%s", argv[2]);
    latency_s = atof(argv[3]) / 1e3;
    bytes_per_s = atof(argv[4]) * 1e6;
    attr_timeout_s = atof(argv[5]);
    int threads = atoi(argv[6]);
    parent = (pid_t)atoi(argv[7]);
    if (latency_s < 0 || bytes_per_s < 0 || attr_timeout_s < 0 || threads < 1) {
        fprintf(stderr, "latency, bandwidth and attr timeout must be >= 0, threads >= 1\n");
        return 2;
    }
    char opts[128];
    snprintf(opts, sizeof opts, "ro,max_threads=%d,max_idle_threads=%d,fsname=latency_fs", threads, threads);
    char *fuse_argv[] = {argv[0], mount_point, "-f", "-o", opts, NULL};
    if (parent) {
        pthread_t t;
        pthread_create(&t, NULL, watch_parent, NULL);
        pthread_detach(t);
    }
    return fuse_main(5, fuse_argv, &ops, NULL);
}
