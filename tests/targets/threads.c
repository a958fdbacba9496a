/* djprobe test target: 4 busy threads with counters, one thread blocked in read(0),
 * the main thread in nanosleep. Prints "ready <pid> <&counters> <add3>" once all run.
 * SIGUSR1 -> prints "usr1". Each line read from stdin -> prints "got <line>". */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define NWORK 4
volatile unsigned long counters[NWORK];
static volatile int started;

__attribute__((noinline, used)) int add3(int a, int b, int c) { return a + b + c; }

static void say(const char *s) { (void)!write(1, s, strlen(s)); }

static void on_usr1(int sig) { (void)sig; say("usr1\n"); }

static void *worker(void *arg) {
    volatile unsigned long *c = &counters[(long)arg];
    __atomic_add_fetch(&started, 1, __ATOMIC_SEQ_CST);
    for (;;) (*c)++;
    return NULL;
}

static void *reader(void *arg) {
    char buf[256], out[300];
    (void)arg;
    __atomic_add_fetch(&started, 1, __ATOMIC_SEQ_CST);
    for (;;) {
        ssize_t n = read(0, buf, sizeof buf - 1);
        if (n <= 0) break;
        buf[n] = 0;
        snprintf(out, sizeof out, "got %s", buf);
        say(out);
    }
    say("eof\n");
    return NULL;
}

int main(void) {
    pthread_t t;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGUSR1, &sa, NULL);
    /* only the main thread takes SIGUSR1, so that it interrupts its nanosleep */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    for (long i = 0; i < NWORK; i++) pthread_create(&t, NULL, worker, (void *)i);
    pthread_create(&t, NULL, reader, NULL);
    pthread_sigmask(SIG_UNBLOCK, &set, NULL);
    while (started < NWORK + 1) usleep(1000);
    char line[128];
    snprintf(line, sizeof line, "ready %d %p %p\n", getpid(), (void *)counters, (void *)add3);
    say(line);
    for (;;) {
        struct timespec ts = {3600, 0};
        nanosleep(&ts, NULL);
    }
}
