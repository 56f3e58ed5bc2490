/*
 * The Linux baseline of `cargo xtask bench ipc`: round trips between two processes over
 * a pair of pipes, and between two threads over futexes, on one CPU. Run under QEMU
 * -icount shift=0, where the TSC counts instructions, so the rdtsc deltas are
 * instruction counts of the whole path, comparable with Peregrine's IPC figures. Like
 * Peregrine's benchmark, each figure is the minimum over the measured round trips,
 * printed as `BENCH <figure> <value> instructions`.
 */
#define _GNU_SOURCE
#include <linux/futex.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define WARMUP 200
#define ROUNDS 2000

static inline uint64_t rdtsc(void)
{
	uint32_t lo, hi;
	__asm__ volatile("lfence; rdtsc; lfence" : "=a"(lo), "=d"(hi)::"memory");
	return ((uint64_t)hi << 32) | lo;
}

static void must(int ok, const char *what)
{
	if (!ok) {
		perror(what);
		exit(1);
	}
}

static void pipe_rt(void)
{
	int p2c[2], c2p[2];
	char b = 0;
	must(pipe(p2c) == 0 && pipe(c2p) == 0, "pipe");
	pid_t pid = fork();
	must(pid >= 0, "fork");
	if (pid == 0) {
		close(p2c[1]);
		close(c2p[0]);
		while (read(p2c[0], &b, 1) == 1)
			must(write(c2p[1], &b, 1) == 1, "child write");
		_exit(0);
	}
	close(p2c[0]);
	close(c2p[1]);
	uint64_t best = UINT64_MAX;
	for (int i = 0; i < WARMUP + ROUNDS; i++) {
		uint64_t t0 = rdtsc();
		must(write(p2c[1], &b, 1) == 1, "write");
		must(read(c2p[0], &b, 1) == 1, "read");
		uint64_t d = rdtsc() - t0;
		if (i >= WARMUP && d < best)
			best = d;
	}
	close(p2c[1]);
	waitpid(pid, NULL, 0);
	printf("BENCH linux_pipe_rt %llu instructions\n", (unsigned long long)best);
}

static int ping, pong;

static void futex_wait(int *addr, int val)
{
	syscall(SYS_futex, addr, FUTEX_WAIT_PRIVATE, val, NULL, NULL, 0);
}

static void futex_wake(int *addr)
{
	syscall(SYS_futex, addr, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
}

static void *ponger(void *arg)
{
	(void)arg;
	for (int i = 0; i < WARMUP + ROUNDS; i++) {
		while (__atomic_load_n(&ping, __ATOMIC_ACQUIRE) == 0)
			futex_wait(&ping, 0);
		__atomic_store_n(&ping, 0, __ATOMIC_RELAXED);
		__atomic_store_n(&pong, 1, __ATOMIC_RELEASE);
		futex_wake(&pong);
	}
	return NULL;
}

static void futex_rt(void)
{
	pthread_t t;
	must(pthread_create(&t, NULL, ponger, NULL) == 0, "pthread_create");
	uint64_t best = UINT64_MAX;
	for (int i = 0; i < WARMUP + ROUNDS; i++) {
		uint64_t t0 = rdtsc();
		__atomic_store_n(&ping, 1, __ATOMIC_RELEASE);
		futex_wake(&ping);
		while (__atomic_load_n(&pong, __ATOMIC_ACQUIRE) == 0)
			futex_wait(&pong, 0);
		__atomic_store_n(&pong, 0, __ATOMIC_RELAXED);
		uint64_t d = rdtsc() - t0;
		if (i >= WARMUP && d < best)
			best = d;
	}
	pthread_join(t, NULL);
	printf("BENCH linux_futex_rt %llu instructions\n", (unsigned long long)best);
}

int main(void)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	pipe_rt();
	futex_rt();
	printf("BENCH done\n");
	return 0;
}
