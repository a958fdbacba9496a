/* Calls the functions of behave.S from several threads and prints checksums: the output must
 * be the same with and without probes. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

long flags_live(long, long);
long redzone_live(long, long);
long riprel(long);
long shortbranch(long);
long lastcall(long);

#define THREADS 4
static long iterations = 200000;
static long sums[THREADS][5];

static void *worker(void *arg) {
    long t = (long)arg;
    for (long i = 0; i < iterations; i++) {
        long x = i * (t + 1) - iterations / 2;
        sums[t][0] += flags_live(x, i % 1000);
        sums[t][1] += redzone_live(x, t + 3);
        sums[t][2] += riprel(i);
        sums[t][3] += shortbranch(i % 17);
        sums[t][4] += lastcall(x);
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc > 1) iterations = atol(argv[1]);
    pthread_t th[THREADS];
    for (long t = 0; t < THREADS; t++) pthread_create(&th[t], NULL, worker, (void *)t);
    for (long t = 0; t < THREADS; t++) pthread_join(th[t], NULL);
    for (long t = 0; t < THREADS; t++)
        printf("thread %ld: %ld %ld %ld %ld %ld\n", t, sums[t][0], sums[t][1], sums[t][2], sums[t][3], sums[t][4]);
    return 7;
}
