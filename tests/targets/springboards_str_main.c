/* springboards_str_main N: 4 threads, each N calls of sb_str(s, k % 5) where s is
   "t<thread>-k<k % 5>", N of sb_exit(k % 3 - 1) and N of sb_share(k % 4) (tests/targets/springboards_str.S);
   prints "done N bad M" at the end (M: calls that returned a wrong value). SIGUSR1 ends the
   rounds early: then it prints "stopped bad M". */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>

long sb_str(const char *s, long n);
int sb_exit(int n);
long sb_share(int n);

static long rounds;
static volatile sig_atomic_t stop;

static void on_usr1(int sig) {
    (void)sig;
    stop = 1;
}

static void *worker(void *arg) {
    long t = (long)arg, bad = 0;
    char buf[32];
    for (long k = 0; k < rounds && !stop; k++) {
        snprintf(buf, sizeof buf, "t%ld-k%ld", t, k % 5);
        bad += sb_str(buf, k % 5) != 0;
        bad += sb_exit((int)(k % 3) - 1) != ((k % 3) == 2 ? 2 : 0);
        bad += sb_share((int)(k % 4)) != 0;
    }
    return (void *)bad;
}

int main(int argc, char **argv) {
    pthread_t th[4];
    rounds = argc > 1 ? atol(argv[1]) : 1000;
    signal(SIGUSR1, on_usr1);
    for (long t = 0; t < 4; t++)
        pthread_create(&th[t], NULL, worker, (void *)t);
    long bad = 0;
    for (int t = 0; t < 4; t++) {
        void *r;
        pthread_join(th[t], &r);
        bad += (long)r;
    }
    if (stop)
        printf("stopped bad %ld\n", bad);
    else
        printf("done %ld bad %ld\n", rounds, bad);
    return 0;
}
