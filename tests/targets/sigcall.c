/* djprobe test target: single thread calls work_s N times and checks it, while a fast
 * interval timer's SIGALRM handler calls work_s too (also from inside a probed work_s, on the
 * stub's stack). Prints "main N handler H bad B"; hits of a probe on work_s must be N + H. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

static volatile long handler_calls, bad;

__attribute__((noinline)) long work_s(long x) {
    volatile long buf[4];              /* red-zone locals */
    buf[0] = x; buf[1] = x * 5; buf[2] = x ^ 0x77; buf[3] = ~x;
    return buf[0] + buf[1] - buf[2] + buf[3];
}
static long ref_s(long x) { return x + x * 5 - (x ^ 0x77) + ~x; }

static void on_alarm(int sig) {
    (void)sig;
    long x = handler_calls * 7 + 3;
    if (work_s(x) != ref_s(x)) bad++;
    handler_calls++;
}

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 1000000;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alarm;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGALRM, &sa, NULL);
    struct itimerval it = {{0, 50}, {0, 50}};
    setitimer(ITIMER_REAL, &it, NULL);
    for (long i = 0; i < n; i++)
        if (work_s(i) != ref_s(i)) bad++;
    struct itimerval off = {{0, 0}, {0, 0}};
    setitimer(ITIMER_REAL, &off, NULL);
    printf("main %ld handler %ld bad %ld\n", n, handler_calls, bad);
    return bad != 0;
}
