/* A program whose main thread keeps on its stack a number it is told: numbers on a stack that
 * fall in a probe area's code part (or spell an address inside displaced bytes) are not return
 * addresses. A worker thread calls hn_work (probed) in a loop until stdin closes.
 *   stdin "hold N\n" (N in hex): main keeps N in a local of its frame and prints "held N".
 *   stdin closed: prints "calls N" and exits 0.
 * hn_work's entry window is two instructions (the displaced bytes have an inside). */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static volatile int stop;
static volatile unsigned long calls;

__attribute__((noinline)) unsigned long hn_work(unsigned long x) {
    __asm__ volatile("" ::: "memory");
    return x * 3 + 1;
}

static void *worker(void *arg) {
    (void)arg;
    unsigned long s = 0;
    while (!stop) {
        s += hn_work(s);
        calls++;
    }
    return (void *)s;
}

int main(void) {
    volatile unsigned long held[8];
    char line[128];
    pthread_t t;
    setvbuf(stdout, NULL, _IOLBF, 0);
    memset((void *)held, 0, sizeof held);
    pthread_create(&t, NULL, worker, NULL);
    printf("ready\n");
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "hold ", 5) == 0) {
            unsigned long n = strtoul(line + 5, NULL, 16);
            for (int i = 0; i < 8; i++)
                held[i] = n;
            printf("held %lx\n", n);
        }
    }
    stop = 1;
    pthread_join(t, NULL);
    printf("calls %lu\n", calls);
    return held[0] == 0 ? 0 : 0;
}
