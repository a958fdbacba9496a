/* djprobe test target: a sender thread queues N real-time signals (each with a value) to the
 * process while 2 busy threads run; the handler counts them and sums their values. Prints
 * "ready", then "done <count> <sum>" once all N arrived (or "lost <count> <sum>" after 20 s). */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define N 20000
static volatile long count, sum;

static void on_rt(int sig, siginfo_t *si, void *uc) {
    (void)sig; (void)uc;
    __atomic_add_fetch(&sum, si->si_value.sival_int, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&count, 1, __ATOMIC_SEQ_CST);
}

static void *spin(void *a) { volatile unsigned long n = 0; for (;;) n++; return a; }

static void *sender(void *a) {
    (void)a;
    for (int i = 0; i < N; i++) {
        union sigval v = {.sival_int = i};
        while (sigqueue(getpid(), SIGRTMIN, v) != 0 && errno == EAGAIN) sched_yield();
    }
    return NULL;
}

int main(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_rt;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigaction(SIGRTMIN, &sa, NULL);
    pthread_t t;
    for (int i = 0; i < 2; i++) pthread_create(&t, NULL, spin, NULL);
    printf("ready\n");
    fflush(stdout);
    pthread_create(&t, NULL, sender, NULL);
    for (int i = 0; i < 20000 && count < N; i++) usleep(1000);
    printf("%s %ld %ld\n", count == N ? "done" : "lost", (long)count, (long)sum);
    fflush(stdout);
    for (;;) pause();
}
