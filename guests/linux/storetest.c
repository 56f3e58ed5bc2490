/*
 * storetest: the helper of the Linux guest's storage tests (guests/linux/init), built
 * statically by xtask (xtask/src/rootfs.rs) and installed in the initramfs and on the
 * ext4 root as /bin/storetest.
 *
 *   storetest pattern SEED BYTES   writes BYTES bytes of the xorshift stream of SEED to
 *                                  stdout (persist-write, persist-check);
 *   storetest crash-write FILE     writes sequence-numbered 4 KiB blocks to FILE (created
 *                                  empty), each followed by fsync, and prints
 *                                  `PEREGRINE-SEQ <n>` once block n's fsync returned;
 *                                  forever, until killed or a write fails;
 *   storetest crash-check FILE     verifies FILE's blocks from 0 and prints
 *                                  `ok <highest> <blocks>` (highest: the last block of the
 *                                  unbroken run of valid blocks from 0, -1 if none;
 *                                  blocks: the file's whole blocks), `hole <highest> <n>`
 *                                  if a valid block n follows an invalid one, or
 *                                  `missing` without the file.
 *
 * The stream: a 64-bit xorshift (13, 7, 17) started at SEED ^ 0x9e3779b97f4a7c15 (that
 * constant itself if the result is 0), each state written as 8 little-endian bytes. A
 * crash block n is the magic "PRGNSEQ1", n as 8 little-endian bytes, then 4080 bytes of
 * the stream of seed n. xtask computes the same (xtask/src/storage.rs).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define BLOCK 4096
#define GOLDEN 0x9e3779b97f4a7c15ull

static uint64_t start(uint64_t seed)
{
	uint64_t x = seed ^ GOLDEN;
	return x ? x : GOLDEN;
}

static uint64_t next(uint64_t *x)
{
	*x ^= *x << 13;
	*x ^= *x >> 7;
	*x ^= *x << 17;
	return *x;
}

static void put_le(unsigned char *p, uint64_t v)
{
	for (int i = 0; i < 8; i++)
		p[i] = (unsigned char)(v >> (8 * i));
}

/* Fills `out` (len bytes) with the stream of `x`, advancing it. */
static void fill(unsigned char *out, size_t len, uint64_t *x)
{
	unsigned char w[8];
	for (size_t i = 0; i < len; i += 8) {
		put_le(w, next(x));
		memcpy(out + i, w, len - i < 8 ? len - i : 8);
	}
}

static void crash_block(unsigned char *b, uint64_t n)
{
	uint64_t x = start(n);
	memcpy(b, "PRGNSEQ1", 8);
	put_le(b + 8, n);
	fill(b + 16, BLOCK - 16, &x);
}

static int pattern(uint64_t seed, uint64_t bytes)
{
	static unsigned char buf[1 << 16];
	uint64_t x = start(seed);
	while (bytes) {
		size_t n = bytes < sizeof buf ? bytes : sizeof buf;
		/* Whole 8-byte words per chunk, so the stream does not depend on chunking. */
		fill(buf, n, &x);
		if (fwrite(buf, 1, n, stdout) != n) {
			perror("storetest: write");
			return 1;
		}
		bytes -= n;
	}
	return fflush(stdout) ? 1 : 0;
}

static int crash_write(const char *path)
{
	unsigned char b[BLOCK];
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (fd < 0) {
		perror("storetest: open");
		return 1;
	}
	/* The new (empty) file and its directory entry are durable before block 0. */
	char dirbuf[4096];
	snprintf(dirbuf, sizeof dirbuf, "%s", path);
	int dir = open(dirname(dirbuf), O_RDONLY | O_DIRECTORY);
	if (fsync(fd) || dir < 0 || fsync(dir)) {
		perror("storetest: fsync");
		return 1;
	}
	close(dir);
	for (uint64_t n = 0;; n++) {
		crash_block(b, n);
		if (pwrite(fd, b, BLOCK, (off_t)(n * BLOCK)) != BLOCK) {
			printf("PEREGRINE-LINUX: crash-write stopped at block %llu: %s\n",
			       (unsigned long long)n, strerror(errno));
			return 1;
		}
		if (fsync(fd)) {
			printf("PEREGRINE-LINUX: crash-write fsync of block %llu: %s\n",
			       (unsigned long long)n, strerror(errno));
			return 1;
		}
		printf("PEREGRINE-SEQ %llu\n", (unsigned long long)n);
		fflush(stdout);
	}
}

static int crash_check(const char *path)
{
	unsigned char want[BLOCK], got[BLOCK];
	int fd = open(path, O_RDONLY);
	if (fd < 0) {
		printf("missing\n");
		return 0;
	}
	long long highest = -1, hole = -1, blocks = 0;
	int broken = 0;
	for (uint64_t n = 0;; n++) {
		ssize_t r = pread(fd, got, BLOCK, (off_t)(n * BLOCK));
		if (r != BLOCK)
			break;
		blocks++;
		crash_block(want, n);
		int valid = memcmp(want, got, BLOCK) == 0;
		if (valid && !broken)
			highest = (long long)n;
		else if (valid && hole < 0)
			hole = (long long)n;
		else if (!valid)
			broken = 1;
	}
	if (hole >= 0)
		printf("hole %lld %lld\n", highest, hole);
	else
		printf("ok %lld %lld\n", highest, blocks);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 4 && !strcmp(argv[1], "pattern"))
		return pattern(strtoull(argv[2], NULL, 0), strtoull(argv[3], NULL, 0));
	if (argc == 3 && !strcmp(argv[1], "crash-write"))
		return crash_write(argv[2]);
	if (argc == 3 && !strcmp(argv[1], "crash-check"))
		return crash_check(argv[2]);
	fprintf(stderr, "usage: storetest pattern SEED BYTES | crash-write FILE | crash-check FILE\n");
	return 2;
}
