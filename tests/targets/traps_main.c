/* Calls the functions of traps.S from 4 threads: 2 started before the go, 2 after it.
   argv[1] = iterations per thread; argv[2] = "wait": print "ready PID", wait for a byte on stdin
   before the work, print "done", wait for a byte (or EOF) before exiting; else run at once. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int t_branch_into(int n);
int t_jumptable(unsigned k);
int t_call_mid(int (*f)(void));
int t_leaf(void);
int t_args(long a, long b, long c, long d, long e, long f);
void t_neither(int *p);

static long iterations;
static int go = 0, counter = 0;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static volatile long sink;

static void *worker(void *arg) {
    long id = (long)arg;
    pthread_mutex_lock(&lock);
    while (!go) pthread_cond_wait(&cond, &lock);
    pthread_mutex_unlock(&lock);
    for (long i = 0; i < iterations; i++) {
        sink += t_branch_into(1 + (int)(i % 3));
        sink += t_jumptable((unsigned)(i % 3));
        sink += t_call_mid(t_leaf);
        sink += t_args(id, i, 3, 4, 5, 6);
        t_neither(&counter);
    }
    return NULL;
}

int main(int argc, char **argv) {
    iterations = argc > 1 ? atol(argv[1]) : 1000;
    int wait = argc > 2 && strcmp(argv[2], "wait") == 0;
    pthread_t t[4];
    char c;
    for (long i = 0; i < 2; i++) pthread_create(&t[i], NULL, worker, (void *)i);
    if (wait) {
        printf("ready %d\n", getpid());
        fflush(stdout);
        if (read(0, &c, 1) != 1) return 1;
    }
    pthread_mutex_lock(&lock);
    go = 1;
    pthread_cond_broadcast(&cond);
    pthread_mutex_unlock(&lock);
    for (long i = 2; i < 4; i++) pthread_create(&t[i], NULL, worker, (void *)i);
    for (int i = 0; i < 4; i++) pthread_join(t[i], NULL);
    printf("done %d\n", counter);
    fflush(stdout);
    if (wait) (void)!read(0, &c, 1);
    return 0;
}
