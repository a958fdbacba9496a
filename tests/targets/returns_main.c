/* Driver for tests/targets/exits.S (return probes, tests/live/test_returns.py).
   usage: returns_main N THREADS  -- each thread runs N iterations and the total is printed.
          returns_main loop        -- prints "ready", then calls the functions until stdin closes. */
#include <pthread.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int x_three(int), x_leaf(int), x_tail(int), x_itail(int), x_self(int), x_paths(int), x_condtail(int), x_chain(int), x_wrap(int);

volatile int sink;

/* recursion: n + 1 calls, n + 1 returns */
__attribute__((noinline)) int rec(int n) {
    if (n <= 0)
        return 0;
    int r = rec(n - 1);
    sink = r;
    return r + 1;
}

static __thread jmp_buf *env;

/* longjmp out of it for n % 5 == 0: those calls never return */
__attribute__((noinline)) int jumper(int n) {
    sink = n;
    if (n % 5 == 0)
        longjmp(*env, 1);
    return n + 1;
}

static int iterations;
static volatile int stop;

static long one(int i, jmp_buf *buf) {
    long s = 0;
    s += x_three(i % 15);
    s += x_tail(i);
    s += x_itail(i);
    s += x_self(i % 4);
    s += x_paths(i % 150 - 20);
    s += x_condtail(i % 3 - 1);
    s += x_chain(i % 4 - 1);
    s += x_wrap(i);
    s += rec(i % 5);
    env = buf;
    if (setjmp(*buf) == 0)
        s += jumper(i);
    else
        s += 1000;
    return s;
}

static void *worker(void *arg) {
    (void)arg;
    jmp_buf buf;
    volatile long sum = 0;
    for (volatile int i = 0; i < iterations; i++)
        sum += one(i, &buf);
    return (void *)sum;
}

static void *looper(void *arg) {
    (void)arg;
    jmp_buf buf;
    for (int i = 0; !stop; i++)
        if (one(i, &buf) < 0)
            abort();
    return NULL;
}

int main(int argc, char **argv) {
    if (argc >= 2 && strcmp(argv[1], "loop") == 0) {
        pthread_t t[4];
        for (int k = 0; k < 4; k++)
            pthread_create(&t[k], NULL, looper, NULL);
        printf("ready\n");
        fflush(stdout);
        char c;
        while (read(0, &c, 1) > 0) {
        }
        stop = 1;
        for (int k = 0; k < 4; k++)
            pthread_join(t[k], NULL);
        printf("done\n");
        return 0;
    }
    if (argc < 3)
        return 2;
    iterations = atoi(argv[1]);
    int threads = atoi(argv[2]);
    pthread_t t[64];
    long total = 0;
    for (int k = 0; k < threads; k++)
        pthread_create(&t[k], NULL, worker, NULL);
    for (int k = 0; k < threads; k++) {
        void *r;
        pthread_join(t[k], &r);
        total += (long)r;
    }
    printf("total=%ld\n", total);
    return 0;
}
