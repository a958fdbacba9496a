/* djprobe test target: creates short-lived threads continuously (each does a little work). */
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>

static void *child(void *arg) {
    volatile unsigned long n = 0;
    (void)arg;
    for (int i = 0; i < 20000; i++) n++;
    return NULL;
}

int main(void) {
    printf("ready %d\n", getpid());
    fflush(stdout);
    for (;;) {
        pthread_t t[4];
        for (int i = 0; i < 4; i++) pthread_create(&t[i], NULL, child, NULL);
        for (int i = 0; i < 4; i++) pthread_join(t[i], NULL);
    }
}
