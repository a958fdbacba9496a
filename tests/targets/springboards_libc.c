/* Calls two libc functions whose entry takes only a short jump (glibc 2.36: sem_trywait and
   pthread_rwlock_tryrdlock: a branch lands within 5 bytes of their first byte) from 4 threads:
   springboards_libc N makes N calls of each per thread and prints what they returned. */
#include <errno.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdio.h>
#include <stdlib.h>

static long rounds;
static sem_t sem;
static pthread_rwlock_t lock = PTHREAD_RWLOCK_INITIALIZER;

static void *worker(void *arg) {
    long ok = 0;
    (void)arg;
    for (long k = 0; k < rounds; k++) {
        if (sem_trywait(&sem) == 0)
            ok++;
        if (pthread_rwlock_tryrdlock(&lock) == 0) {
            ok++;
            pthread_rwlock_unlock(&lock);
        }
    }
    return (void *)ok;
}

int main(int argc, char **argv) {
    rounds = argc > 1 ? atol(argv[1]) : 1000;
    sem_init(&sem, 0, (unsigned)(3 * rounds));  /* the 4th thread's share fails: EAGAIN */
    pthread_t th[4];
    for (long t = 0; t < 4; t++)
        pthread_create(&th[t], NULL, worker, (void *)t);
    long total = 0;
    for (int t = 0; t < 4; t++) {
        void *r;
        pthread_join(th[t], &r);
        total += (long)r;
    }
    printf("done rounds=%ld ok=%ld\n", rounds, total);
    return 0;
}
