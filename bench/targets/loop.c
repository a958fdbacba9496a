/* The loop benchmark target: THREADS threads each call one small function N times.
 *
 *   loop FUNC N THREADS OUTFILE [gate] [round=M pause=US]
 *
 * FUNC is "work" (no counter), "atomic" (work_atomic: one lock-incremented counter compiled in),
 * "plain" (work_plain: a plain per-thread counter compiled in, the physical limit), "tsc"
 * (work_tsc: a per-thread log2 histogram of TSC durations compiled in, the limit of latency) or
 * "str" (work_str(BENCH_STRING, limit): the same code with a string as first argument). The result
 * line "calls=C elapsed_ns=E threads=T atomic=A plain=P checksum=S" goes to OUTFILE ("-" for
 * stdout).
 * E is the longest time any thread spent in its loop (CLOCK_MONOTONIC around the loop only,
 * threads released together), so startup and tool attach time are excluded.
 * With "gate", the program prints "ready PID" on stdout and waits for a line on stdin before the
 * loop, and for another line after writing the result before it exits.
 * With "round=M pause=US", each thread makes its calls in rounds of M, sleeping US microseconds
 * between rounds (time for a consumer to drain event rings); only the calls are timed.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

long work(long x, long limit);
long work_atomic(long x, long limit);
long work_plain(long x, long limit);
long work_tsc(long x, long limit);
long work_str(const char *s, long limit);
#define BENCH_STRING "/usr/share/djprobe/bench-string"  /* 31 bytes + NUL, like a path */
extern volatile long atomic_hits;
extern __thread long plain_hits;
static long plain_total;

static long n_calls, round_calls, pause_us;
static int use_atomic, use_plain, use_tsc, use_str;
static pthread_barrier_t barrier;

struct result { long calls, checksum; long long elapsed_ns; };  /* long long: also built -m32 (loop32) */

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static long calls(long from, long to, long limit, long *sum) {
    long i, s = 0;
    if (use_atomic)
        for (i = from; i < to; i++) s += work_atomic(i, limit);
    else if (use_plain)
        for (i = from; i < to; i++) s += work_plain(i, limit);
    else if (use_tsc)
        for (i = from; i < to; i++) s += work_tsc(i, limit);
    else if (use_str)
        for (i = from; i < to; i++) s += work_str(BENCH_STRING, limit);
    else
        for (i = from; i < to; i++) s += work(i, limit);
    *sum += s;
    return to - from;
}

static void *worker(void *arg) {
    struct result *r = arg;
    long sum = 0, done = 0, limit = n_calls / 2;
    pthread_barrier_wait(&barrier);
    if (round_calls <= 0) {
        long long t0 = now_ns();
        done = calls(0, n_calls, limit, &sum);
        r->elapsed_ns = now_ns() - t0;
    } else {
        r->elapsed_ns = 0;
        while (done < n_calls) {
            long end = done + round_calls < n_calls ? done + round_calls : n_calls;
            long long t0 = now_ns();
            done += calls(done, end, limit, &sum);
            r->elapsed_ns += now_ns() - t0;
            usleep(pause_us);
        }
    }
    r->calls = done;
    r->checksum = sum;
    __atomic_add_fetch(&plain_total, plain_hits, __ATOMIC_SEQ_CST);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: %s work|atomic|plain|str N THREADS OUTFILE [gate]\n", argv[0]);
        return 2;
    }
    use_atomic = strcmp(argv[1], "atomic") == 0;
    use_plain = strcmp(argv[1], "plain") == 0;
    use_tsc = strcmp(argv[1], "tsc") == 0;
    use_str = strcmp(argv[1], "str") == 0;
    n_calls = atol(argv[2]);
    int threads = atoi(argv[3]);
    if (threads < 1 || threads > 64) return 2;
    int gate = 0;
    for (int a = 5; a < argc; a++) {
        if (strcmp(argv[a], "gate") == 0) gate = 1;
        else if (strncmp(argv[a], "round=", 6) == 0) round_calls = atol(argv[a] + 6);
        else if (strncmp(argv[a], "pause=", 6) == 0) pause_us = atol(argv[a] + 6);
        else return 2;
    }
    if (gate) {
        char line[64];
        printf("ready %d\n", getpid());
        fflush(stdout);
        if (!fgets(line, sizeof line, stdin)) return 3;
    }
    pthread_t th[64];
    struct result res[64];
    pthread_barrier_init(&barrier, NULL, threads);
    for (int t = 1; t < threads; t++) pthread_create(&th[t], NULL, worker, &res[t]);
    worker(&res[0]);
    long calls = res[0].calls, sum = res[0].checksum;
    long long elapsed = res[0].elapsed_ns;
    for (int t = 1; t < threads; t++) {
        pthread_join(th[t], NULL);
        calls += res[t].calls;
        sum += res[t].checksum;
        if (res[t].elapsed_ns > elapsed) elapsed = res[t].elapsed_ns;
    }
    FILE *out = strcmp(argv[4], "-") == 0 ? stdout : fopen(argv[4], "w");
    if (!out) return 4;
    fprintf(out, "calls=%ld elapsed_ns=%lld threads=%d atomic=%ld plain=%ld checksum=%ld\n", calls, elapsed,
            threads, (long)atomic_hits, plain_total, sum);
    fclose(out);
    if (gate) { /* hold until told to exit: the tool may read its count from this process */
        char line[64];
        if (!fgets(line, sizeof line, stdin)) return 0;
    }
    return 0;
}
