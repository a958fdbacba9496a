/* THREADS threads call f(i, 2i, 3i, 4i, 5i, 6i) for i in [0, N) and print their TIDs. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#define THREADS 3
static long n_calls = 1000;
volatile long sink;

__attribute__((noinline)) long f(long a, long b, long c, long d, long e, long g) {
    sink += a + b + c + d + e + g;
    return a;
}

static void *worker(void *arg) {
    long t = (long)arg;
    printf("tid %d\n", gettid());
    fflush(stdout);
    for (long i = 0; i < n_calls; i++) f(t * 1000000 + i, 2 * i, 3 * i, 4 * i, 5 * i, 6 * i);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc > 1) n_calls = atol(argv[1]);
    pthread_t th[THREADS];
    for (long t = 0; t < THREADS; t++) pthread_create(&th[t], NULL, worker, (void *)t);
    for (long t = 0; t < THREADS; t++) pthread_join(th[t], NULL);
    return 0;
}
