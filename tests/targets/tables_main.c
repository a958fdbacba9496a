/* Drives tests/targets/tables.S from 4 threads: tables_main N runs N rounds per thread and
   prints the sums (the same with or without probes). */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

int t_two(const int sel[2]);
int t_loop(const int *v, int n);
long t_one(long x);
long t_tail(long (*f)(long), long x);
long t_tail0(long x);
long t_computed(long i);
int t_memidx(const int *v, long i);

static long twice(long x) { return 2 * x; }

/* called through a pointer only: no direct call reaches t_tail, its one direct way in is
   t_tail0's jmp (which zeroes the pointer argument) */
static long (*volatile tail_ptr)(long (*)(long), long) = t_tail;

static long rounds;

static void *worker(void *arg) {
    long seed = (long)arg, sum = 0;
    int v[8];
    for (long i = 0; i < rounds; i++) {
        int sel[2] = {(int)((i + seed) % 5), (int)((i / 5 + seed) % 4)};
        sum += t_two(sel);
        for (int k = 0; k < 8; k++)
            v[k] = (int)((i + k + seed) % 3);
        sum += t_loop(v, 8);
        sum += t_one(i);
        sum += tail_ptr(twice, i) + t_tail0(i);
        sum += t_computed(i % 3);
        sum += t_memidx(v, i % 4);
    }
    return (void *)sum;
}

int main(int argc, char **argv) {
    rounds = argc > 1 ? atol(argv[1]) : 1000;
    pthread_t th[4];
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
