/* djprobe test target for the target's life (tests/live/test_target_life.py).
 * Also built with -m32.
 *
 *   life wait N        prints "ready <pid>", waits for a line on stdin, then calls f_add N times
 *                      and prints "sum=<s>" and "done": its normal output.
 *   life leader N      the main thread starts 3 workers and calls pthread_exit. Each worker
 *                      prints "w<i> ready", and for each line "go" on stdin (read by worker 0
 *                      and passed on) calls f_add N times, then prints "w<i> did N".
 *                      "quit" ends the process (exit status 0).
 *   life term          prints "ready <pid>", waits; on SIGTERM, SIGINT or SIGHUP prints "got signal <N>
 *                      f_add=<its first 5 code bytes in hex>" and exits with status 100 + N.
 *   life blockread     prints "ready <pid>", then reads stdin with raw_read, printing "got <n>" for
 *                      each read, until end of file (exit status 0). SIGUSR1: its handler prints
 *                      "in handler", reads a line itself and prints "handler got <n>".
 *   life slowterm      prints "ready <pid>"; prints "got signal <N> #<count>" for each SIGTERM, SIGINT,
 *                      SIGHUP; exits 0.3 s after the first with status 100 + the last N.
 *   life vdso N        prints "ready <pid>", waits for a line, calls clock_gettime N times,
 *                      prints "vdso did N", waits for a line again, then exits.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

__attribute__((noinline, used)) long f_add(long a, long b) {
    __asm__ volatile("" ::: "memory");
    return a + b;
}

/* read(2) by hand, the syscall the last of the first 5+ bytes: a probe here displaces it, and a
 * thread blocked in it is moved into the stub at insertion and stays there at removal. */
__attribute__((naked, noinline, used)) long raw_read(long fd, void *buf, long n) {
    __asm__ volatile("xor %eax, %eax\n\tmov %edi, %edi\n\tsyscall\n\tret\n");
}

static void say(const char *s) { (void)!write(1, s, strlen(s)); }

static int read_line(char *buf, int size) {
    int n = 0;
    while (n < size - 1) {
        char c;
        if (read(0, &c, 1) != 1) break;
        if (c == '\n') break;
        buf[n++] = c;
    }
    buf[n] = 0;
    return n;
}

static long run_adds(long n) {
    long s = 0;
    for (long i = 0; i < n; i++) s = f_add(s, i);
    return s;
}

/* leader mode */
#define NW 3
static long rounds;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int generation;

static void *worker(void *arg) {
    long id = (long)arg;
    char out[64];
    int seen = 0;
    snprintf(out, sizeof out, "w%ld ready\n", id);
    say(out);
    for (;;) {
        if (id == 0) {
            char line[64];
            if (read_line(line, sizeof line) == 0 || strcmp(line, "quit") == 0) exit(0);
            pthread_mutex_lock(&mu);
            generation++;
            pthread_cond_broadcast(&cv);
            pthread_mutex_unlock(&mu);
        }
        pthread_mutex_lock(&mu);
        while (generation == seen) pthread_cond_wait(&cv, &mu);
        seen = generation;
        pthread_mutex_unlock(&mu);
        run_adds(rounds);
        snprintf(out, sizeof out, "w%ld did %ld\n", id, rounds);
        say(out);
    }
    return NULL;
}

/* blockread mode: a handler that waits for a line of its own (libc read, not raw_read) */
static void on_usr1(int sig) {
    char buf[64], out[64];
    (void)sig;
    say("in handler\n");
    long n = read(0, buf, sizeof buf);
    snprintf(out, sizeof out, "handler got %ld\n", n);
    say(out);
}

/* slowterm mode: count the signals, end 0.3 s after the first (so a second one would show) */
static volatile sig_atomic_t nsignals, lastsig;

static void on_count(int sig) {
    char out[64];
    nsignals++;
    lastsig = sig;
    snprintf(out, sizeof out, "got signal %d #%d\n", sig, (int)nsignals);
    say(out);
}

static void on_term(int sig) {
    const unsigned char *code = (const unsigned char *)f_add;
    char out[64];
    snprintf(out, sizeof out, "got signal %d f_add=%02x%02x%02x%02x%02x\n", sig, code[0], code[1], code[2],
             code[3], code[4]);
    say(out);
    _exit(100 + sig);
}

int main(int argc, char **argv) {
    char out[128], line[64];
    if (argc < 2) return 2;
    if (strcmp(argv[1], "wait") == 0 && argc > 2) {
        long n = atol(argv[2]);
        snprintf(out, sizeof out, "ready %d\n", (int)getpid());
        say(out);
        read_line(line, sizeof line);
        snprintf(out, sizeof out, "sum=%ld\ndone\n", run_adds(n));
        say(out);
        return 0;
    }
    if (strcmp(argv[1], "leader") == 0 && argc > 2) {
        pthread_t t;
        rounds = atol(argv[2]);
        for (long i = 0; i < NW; i++) pthread_create(&t, NULL, worker, (void *)i);
        pthread_exit(NULL);
    }
    if (strcmp(argv[1], "term") == 0) {
        signal(SIGTERM, on_term);
        signal(SIGINT, on_term);
        signal(SIGHUP, on_term);
        snprintf(out, sizeof out, "ready %d\n", (int)getpid());
        say(out);
        for (;;) pause();
    }
    if (strcmp(argv[1], "blockread") == 0) {
        char buf[64];
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_usr1;
        sa.sa_flags = SA_RESTART;
        sigaction(SIGUSR1, &sa, NULL);
        snprintf(out, sizeof out, "ready %d\n", (int)getpid());
        say(out);
        for (;;) {
            long n = raw_read(0, buf, sizeof buf);
            if (n <= 0) return 0;
            snprintf(out, sizeof out, "got %ld\n", n);
            say(out);
        }
    }
    if (strcmp(argv[1], "slowterm") == 0) {
        struct timespec t0, now;
        signal(SIGTERM, on_count);
        signal(SIGINT, on_count);
        signal(SIGHUP, on_count);
        snprintf(out, sizeof out, "ready %d\n", (int)getpid());
        say(out);
        while (!nsignals) pause();
        clock_gettime(CLOCK_MONOTONIC, &t0);
        do {
            usleep(10000);
            clock_gettime(CLOCK_MONOTONIC, &now);
        } while ((now.tv_sec - t0.tv_sec) * 1000000000L + (now.tv_nsec - t0.tv_nsec) < 300000000L);
        return 100 + lastsig;
    }
    if (strcmp(argv[1], "vdso") == 0 && argc > 2) {
        long n = atol(argv[2]);
        struct timespec ts;
        snprintf(out, sizeof out, "ready %d\n", (int)getpid());
        say(out);
        read_line(line, sizeof line);
        for (long i = 0; i < n; i++) clock_gettime(CLOCK_MONOTONIC, &ts);
        snprintf(out, sizeof out, "vdso did %ld\n", n);
        say(out);
        read_line(line, sizeof line);
        return 0;
    }
    return 2;
}
