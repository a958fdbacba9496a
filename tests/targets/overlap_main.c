/* THREADS threads call ov_f, ov_flags, ov_short, ov_two, ov_tail and ov_path in phases the test drives on stdin:
 *   "go N"  each thread makes exactly N calls of each, then main prints "done BAD";
 *   "spin"  threads call until "stop" (then main prints "stopped BAD");
 * EOF ends the program. "run N" as argv runs one phase of N and exits. Results are checked. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define THREADS 4
long ov_f(long x);
long ov_flags(long x);
int ov_short(int x);
int ov_two(int x);
int ov_tail(int x);
int ov_path(int x);

static volatile long phase, quota, spin_flag, finished, bad_total;

static long expect_f(long x) { return 3 * ((x + 1) & 0xffffffff) + 5 * (x & 1); }

static long calls(long t, long n) {
    long bad = 0;
    for (long i = 0; n < 0 ? __atomic_load_n(&spin_flag, __ATOMIC_ACQUIRE) : i < n; i++) {
        long x = (i * 7 + t) & 0xffff;
        if (ov_f(x) != expect_f(x)) bad++;
        if (ov_flags(x & 15) != ((x & 15) < 10 ? 1 : 2)) bad++;
        if (ov_short((int)x) != (int)x + 1) bad++;
        if (ov_two((int)(x & 7) - 3) != ((int)(x & 7) - 3 < 0 ? 0 : (int)(x & 7) - 3)) bad++;
        int y = (int)(x & 7) - 3;
        if (ov_tail(y) != (y < 0 ? y + 1 : 2 * y)) bad++;
        if (ov_path(y) != (y == 0 ? 7 : y + 3)) bad++;
    }
    return bad;
}

static void *worker(void *arg) {
    long t = (long)arg, seen = 0;
    for (;;) {
        long p;
        while ((p = __atomic_load_n(&phase, __ATOMIC_ACQUIRE)) == seen) usleep(100);
        seen = p;
        long bad = calls(t, quota);
        __atomic_fetch_add(&bad_total, bad, __ATOMIC_RELAXED);
        __atomic_fetch_add(&finished, 1, __ATOMIC_RELEASE);
    }
    return NULL;
}

static long run_phase(long n) {
    finished = 0;
    quota = n;
    __atomic_fetch_add(&phase, 1, __ATOMIC_RELEASE);
    return 0;
}

static void wait_phase(void) {
    while (__atomic_load_n(&finished, __ATOMIC_ACQUIRE) < THREADS) usleep(200);
}

int main(int argc, char **argv) {
    pthread_t th[THREADS];
    for (long t = 0; t < THREADS; t++) pthread_create(&th[t], NULL, worker, (void *)t);
    if (argc > 2 && strcmp(argv[1], "run") == 0) {
        run_phase(atol(argv[2]));
        wait_phase();
        printf("done %ld\n", bad_total);
        return bad_total != 0;
    }
    printf("ready %d\n", getpid());
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "go ", 3) == 0) {
            run_phase(atol(line + 3));
            wait_phase();
            printf("done %ld\n", bad_total);
        } else if (strncmp(line, "spin", 4) == 0) {
            spin_flag = 1;
            run_phase(-1);
            printf("spinning\n");
        } else if (strncmp(line, "stop", 4) == 0) {
            __atomic_store_n(&spin_flag, 0, __ATOMIC_RELEASE);
            wait_phase();
            printf("stopped %ld\n", bad_total);
        }
        fflush(stdout);
    }
    return bad_total != 0;
}
