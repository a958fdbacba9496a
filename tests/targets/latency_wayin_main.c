/* Threads calling the functions of latency_wayin.S with 0 (the early return) and with other
   values; prints the sum of the results so that a probed run can be compared with a plain one.
   Usage: latency_wayin N THREADS */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

long lat_wayin_far(long);
long lat_wayin_near(long);
long lat_grow_ret(long);
long lat_grow_path(long, long);

static long n;

static void *worker(void *arg) {
    long sum = 0, t = (long)arg;
    for (long i = 0; i < n; i++) {
        long x = (i % 3 == 0) ? 0 : i + t;  /* a third of the calls take the early return */
        sum += lat_wayin_far(x) + lat_wayin_near(x);
        sum += lat_grow_ret(i + t) + lat_grow_path(i, x ? t + 1 : 0);
    }
    return (void *)sum;
}

int main(int argc, char **argv) {
    n = argc > 1 ? atol(argv[1]) : 1000;
    int threads = argc > 2 ? atoi(argv[2]) : 2;
    pthread_t tid[16];
    long total = 0;
    for (long t = 0; t < threads; t++)
        pthread_create(&tid[t], NULL, worker, (void *)t);
    for (int t = 0; t < threads; t++) {
        void *r;
        pthread_join(tid[t], &r);
        total += (long)r;
    }
    printf("sum %ld\n", total);
    return 0;
}
