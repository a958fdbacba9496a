/* djprobe test target: loads a plug-in (argv[1]) with dlopen after start-up, from two threads.
 * Prints "ready PID", then for each line "l" on stdin runs one round: two threads each dlopen the
 * plug-in (the first maps it, the second only takes a reference), wait for each other, call
 * plug_work CALLS times each checking every result, wait again and dlclose it (the library is
 * unmapped after the second dlclose). A line "s" prints "stage N" first (a handshake point).
 * At EOF prints "rounds R calls C bad B ctor K" (K: constructor calls seen by the plug-in during
 * the rounds, summed) and exits with 0, or 3 if any result was wrong. */
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define CALLS 50000L
static const char *plugin;
static pthread_barrier_t barrier;
static long bad, ctor_total, calls_total;

static void *round_thread(void *arg) {
    long t = (long)arg;
    void *h = dlopen(plugin, RTLD_NOW);
    if (!h) { fprintf(stderr, "dlopen: %s\n", dlerror()); exit(2); }
    long (*work)(long) = (long (*)(long))dlsym(h, "plug_work");
    long (*loaded)(void) = (long (*)(void))dlsym(h, "plug_loaded_calls");
    pthread_barrier_wait(&barrier);
    for (long i = 0; i < CALLS; i++) {
        long x = i * 2 + t;
        if (work(x) != x * 5 + 3) __atomic_fetch_add(&bad, 1, __ATOMIC_RELAXED);
        __atomic_fetch_add(&calls_total, 1, __ATOMIC_RELAXED);
    }
    if (t == 0) ctor_total += loaded();
    pthread_barrier_wait(&barrier);
    dlclose(h);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    plugin = argv[1];
    pthread_barrier_init(&barrier, NULL, 2);
    printf("ready %d\n", (int)getpid());
    fflush(stdout);
    char line[64];
    long rounds = 0, stage = 0;
    while (fgets(line, sizeof line, stdin)) {
        if (line[0] == 's') { printf("stage %ld\n", ++stage); fflush(stdout); continue; }
        if (line[0] != 'l') continue;
        pthread_t th[2];
        for (long t = 0; t < 2; t++) pthread_create(&th[t], NULL, round_thread, (void *)t);
        for (int t = 0; t < 2; t++) pthread_join(th[t], NULL);
        if (dlopen(plugin, RTLD_NOLOAD | RTLD_NOW)) { fprintf(stderr, "still loaded\n"); return 4; }
        rounds++;
    }
    printf("rounds %ld calls %ld bad %ld ctor %ld\n", rounds, calls_total, bad, ctor_total);
    return bad ? 3 : 0;
}
