/*
 * diskbench: block-device throughput of the Linux guest, built statically by xtask
 * (xtask/src/rootfs.rs) and installed in the initramfs and on the ext4 root as
 * /bin/diskbench.
 *
 *   diskbench [-w] [-m MIB] [-t SECONDS] DEVICE
 *
 * With O_DIRECT on DEVICE (the page cache out of the way), over its first MIB MiB
 * (default: the whole device, at most 64 MiB):
 *   - sequential read with 1 MiB requests, one at a time: seq_read_mb_s (MB = 10^6
 *     bytes, as bench boot's read_mb_s);
 *   - with -w only, sequential write of a pattern with 1 MiB requests, then fdatasync,
 *     both inside the time: seq_write_mb_s. This overwrites the region: -w is refused
 *     on a device that /proc/mounts lists (or a partition of it), and the device is
 *     opened with O_EXCL, which the kernel refuses while a file system holds it;
 *   - 4 KiB reads at random 4 KiB-aligned offsets for SECONDS (default 2) each, one at a
 *     time (rand_read_4k_qd1_iops, and the mean latency rand_read_4k_qd1_lat_us) and 32
 *     in flight through Linux native AIO (io_setup/io_submit/io_getevents as raw system
 *     calls, no libaio): rand_read_4k_qd32_iops.
 * Each figure is one line `PEREGRINE-BENCH disk <figure> <value>`, which xtask parses
 * (xtask/src/bench_disk.rs). Exit status 0 only if every measurement completed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MIB (1u << 20)
#define SMALL 4096
#define QD 32

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static uint64_t rng = 0x9e3779b97f4a7c15ull;

static uint64_t next(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}

static void fail(const char *what)
{
	fprintf(stderr, "diskbench: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void figure(const char *name, double value)
{
	printf("PEREGRINE-BENCH disk %s %.1f\n", name, value);
	fflush(stdout);
}

/* Whether `dev` or a name that begins with it (its partitions) is the source of a
 * mount in /proc/mounts. */
static int mounted(const char *dev)
{
	char line[1024];
	FILE *f = fopen("/proc/mounts", "r");
	if (!f)
		return 1; /* cannot tell: assume it is */
	size_t len = strlen(dev);
	int found = 0;
	while (fgets(line, sizeof line, f))
		if (!strncmp(line, dev, len))
			found = 1;
	fclose(f);
	return found;
}

static uint64_t size_of(int fd)
{
	struct stat st;
	uint64_t size = 0;
	if (fstat(fd, &st))
		fail("fstat");
	if (S_ISBLK(st.st_mode)) {
		if (ioctl(fd, BLKGETSIZE64, &size))
			fail("BLKGETSIZE64");
		return size;
	}
	return (uint64_t)st.st_size;
}

static void *aligned(size_t len)
{
	void *p;
	if (posix_memalign(&p, SMALL, len))
		fail("posix_memalign");
	memset(p, 0, len);
	return p;
}

static void seq_read(int fd, uint64_t region)
{
	unsigned char *buf = aligned(MIB);
	double t0 = now();
	for (uint64_t off = 0; off < region; off += MIB)
		if (pread(fd, buf, MIB, (off_t)off) != MIB)
			fail("sequential read");
	figure("seq_read_mb_s", (double)region / 1e6 / (now() - t0));
	free(buf);
}

static void seq_write(int fd, uint64_t region)
{
	unsigned char *buf = aligned(MIB);
	for (size_t i = 0; i < MIB; i += 8) {
		uint64_t v = next();
		memcpy(buf + i, &v, 8);
	}
	double t0 = now();
	for (uint64_t off = 0; off < region; off += MIB)
		if (pwrite(fd, buf, MIB, (off_t)off) != MIB)
			fail("sequential write");
	if (fdatasync(fd))
		fail("fdatasync");
	figure("seq_write_mb_s", (double)region / 1e6 / (now() - t0));
	free(buf);
}

static off_t random_block(uint64_t region)
{
	return (off_t)(next() % (region / SMALL) * SMALL);
}

static void rand_read_qd1(int fd, uint64_t region, double secs)
{
	unsigned char *buf = aligned(SMALL);
	uint64_t done = 0;
	double t0 = now(), t;
	do {
		if (pread(fd, buf, SMALL, random_block(region)) != SMALL)
			fail("random read");
		done++;
		t = now() - t0;
	} while (t < secs);
	figure("rand_read_4k_qd1_iops", (double)done / t);
	figure("rand_read_4k_qd1_lat_us", t / (double)done * 1e6);
	free(buf);
}

static long sys_io_setup(unsigned n, aio_context_t *ctx)
{
	return syscall(SYS_io_setup, n, ctx);
}

static long sys_io_submit(aio_context_t ctx, long n, struct iocb **iocbs)
{
	return syscall(SYS_io_submit, ctx, n, iocbs);
}

static long sys_io_getevents(aio_context_t ctx, long min, long max, struct io_event *ev)
{
	return syscall(SYS_io_getevents, ctx, min, max, ev, NULL);
}

static long sys_io_destroy(aio_context_t ctx)
{
	return syscall(SYS_io_destroy, ctx);
}

static void rand_read_qd32(int fd, uint64_t region, double secs)
{
	aio_context_t ctx = 0;
	struct iocb cb[QD], *one[1];
	struct io_event ev[QD];
	unsigned char *bufs = aligned((size_t)QD * SMALL);
	if (sys_io_setup(QD, &ctx))
		fail("io_setup");
	memset(cb, 0, sizeof cb);
	for (int i = 0; i < QD; i++) {
		cb[i].aio_fildes = (uint32_t)fd;
		cb[i].aio_lio_opcode = IOCB_CMD_PREAD;
		cb[i].aio_buf = (uint64_t)(uintptr_t)(bufs + (size_t)i * SMALL);
		cb[i].aio_nbytes = SMALL;
		cb[i].aio_offset = random_block(region);
		cb[i].aio_data = (uint64_t)i;
		one[0] = &cb[i];
		if (sys_io_submit(ctx, 1, one) != 1)
			fail("io_submit");
	}
	uint64_t done = 0;
	long inflight = QD;
	double t0 = now(), t = 0;
	while (inflight) {
		long got = sys_io_getevents(ctx, 1, QD, ev);
		if (got < 0) {
			if (errno == EINTR)
				continue;
			fail("io_getevents");
		}
		t = now() - t0;
		for (long e = 0; e < got; e++) {
			inflight--;
			if (ev[e].res != SMALL) {
				errno = ev[e].res < 0 ? (int)-ev[e].res : EIO;
				fail("random read (aio)");
			}
			done++;
			if (t < secs) {
				struct iocb *c = &cb[ev[e].data];
				c->aio_offset = random_block(region);
				one[0] = c;
				if (sys_io_submit(ctx, 1, one) != 1)
					fail("io_submit");
				inflight++;
			}
		}
	}
	figure("rand_read_4k_qd32_iops", (double)done / t);
	sys_io_destroy(ctx);
	free(bufs);
}

int main(int argc, char **argv)
{
	int write = 0, opt;
	uint64_t mib = 64;
	double secs = 2;
	while ((opt = getopt(argc, argv, "wm:t:")) != -1) {
		switch (opt) {
		case 'w':
			write = 1;
			break;
		case 'm':
			mib = strtoull(optarg, NULL, 0);
			break;
		case 't':
			secs = strtod(optarg, NULL);
			break;
		default:
			goto usage;
		}
	}
	if (optind != argc - 1 || mib == 0)
		goto usage;
	const char *dev = argv[optind];
	if (write && mounted(dev)) {
		fprintf(stderr, "diskbench: %s is mounted: no -w on it\n", dev);
		return 2;
	}
	/* For writing also O_EXCL: the kernel refuses a block device something holds
	 * (a mounted file system), whatever name it was opened by. */
	int fd = open(dev, (write ? O_RDWR | O_EXCL : O_RDONLY) | O_DIRECT);
	if (fd < 0)
		fail(dev);
	uint64_t size = size_of(fd) / MIB * MIB;
	uint64_t region = mib * MIB < size ? mib * MIB : size;
	if (region == 0) {
		fprintf(stderr, "diskbench: %s is smaller than 1 MiB\n", dev);
		return 1;
	}
	printf("PEREGRINE-LINUX: diskbench %s: %llu MiB, random reads %.1f s each\n", dev,
	       (unsigned long long)(region / MIB), secs);
	seq_read(fd, region);
	if (write)
		seq_write(fd, region);
	rand_read_qd1(fd, region, secs);
	rand_read_qd32(fd, region, secs);
	close(fd);
	return 0;
usage:
	fprintf(stderr, "usage: diskbench [-w] [-m MIB] [-t SECONDS] DEVICE\n");
	return 2;
}
