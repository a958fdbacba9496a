/* Drives tests/targets/springboards.S from 4 threads.
   springboards_main N: N calls of sb_near(k % 5) per thread (its loop body runs k % 5 times),
   then prints the totals.
   springboards_main loop: prints "ready", calls until stdin is closed, then prints
   "calls N bad M" (bad: calls that did not return 0); each line "s" read before prints
   "status N M" with the figures so far. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

long sb_near(int n);

static long rounds;
static volatile int stop;
static long calls[4], bad[4];

static void *worker(void *arg) {
    long sum = (long)arg;
    for (long k = 0; k < rounds; k++)
        sum += sb_near((int)(k % 5)) + k % 5;
    return (void *)sum;
}

static void *looper(void *arg) {
    long t = (long)arg;
    for (long k = 0; !stop; k++) {
        if (sb_near((int)(k % 5)) != 0)
            bad[t]++;
        calls[t]++;
    }
    return NULL;
}

int main(int argc, char **argv) {
    pthread_t th[4];
    if (argc > 1 && strcmp(argv[1], "loop") == 0) {
        for (long t = 0; t < 4; t++)
            pthread_create(&th[t], NULL, looper, (void *)t);
        printf("ready\n");
        fflush(stdout);
        char buf[64];
        while (fgets(buf, sizeof buf, stdin) != NULL) {
            if (buf[0] == 's') {
                long c = 0, b = 0;
                for (int t = 0; t < 4; t++)
                    c += calls[t], b += bad[t];
                printf("status %ld %ld\n", c, b);
                fflush(stdout);
            }
        }
        stop = 1;
        long c = 0, b = 0;
        for (int t = 0; t < 4; t++) {
            pthread_join(th[t], NULL);
            c += calls[t];
            b += bad[t];
        }
        printf("calls %ld bad %ld\n", c, b);
        return 0;
    }
    rounds = argc > 1 ? atol(argv[1]) : 1000;
    for (long t = 0; t < 4; t++)
        pthread_create(&th[t], NULL, worker, (void *)t);
    long total = 0;
    for (int t = 0; t < 4; t++) {
        void *r;
        pthread_join(th[t], &r);
        total += (long)r;
    }
    printf("done rounds=%ld total=%ld\n", rounds, total);
    return 0;
}
