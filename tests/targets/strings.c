/* String arguments for probes that fetch them at the hit.
 * usage: strings THREADS N
 * Each thread calls ev_str(buf, i) N times with buf = "t<thread>-<i>" and overwrites buf right after
 * each call (so only a copy taken at the hit shows the contents). Then the main thread calls
 * ev_str with NULL (n = -1), (char *)1 (-2), an unmapped page (-3), the last 3 bytes of a page
 * before an unmapped one without a NUL ("xyz", -4) and with one ("ab", -5), and a 1,000-byte
 * string (-6). With a third argument "fork": a forked child calls ev_str("child-side", 100) on a
 * buffer that holds "parent-side" in the parent, which calls ev_str(buf, 200) once the child has
 * exited; with "wide", ev_wide(-0x123456789abcdef, "wide", -7) once. Prints the sum of the n given to ev_str (the parent's), which a probe must not change. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

static volatile long total;

__attribute__((noinline)) long ev_str(const char *s, long n)
{
    __asm__ volatile(".rept 8\n\tnop\n\t.endr" : : "r"(s) : "memory"); /* room for entry and exit windows */
    return __atomic_add_fetch(&total, n, __ATOMIC_RELAXED);
}

/* a 64-bit parameter between two others: two stack words in 32-bit code */
__attribute__((noinline)) long ev_wide(long long v, const char *s, int k)
{
    __asm__ volatile(".rept 8\n\tnop\n\t.endr" : : "r"(s) : "memory");
    return __atomic_add_fetch(&total, (long)(v & 0xff) + k, __ATOMIC_RELAXED);
}

static long n_calls;

static void *worker(void *arg)
{
    long t = (long)arg;
    char buf[32];
    for (long i = 0; i < n_calls; i++) {
        snprintf(buf, sizeof buf, "t%ld-%ld", t, i);
        ev_str(buf, i);
        memset(buf, 'X', sizeof buf - 1);
        buf[sizeof buf - 1] = 0;
        __asm__ volatile("" : : "r"(buf) : "memory");
    }
    return NULL;
}

int main(int argc, char **argv)
{
    int threads = argc > 1 ? atoi(argv[1]) : 1;
    n_calls = argc > 2 ? atol(argv[2]) : 10;
    pthread_t tid[64];
    for (long t = 0; t < threads; t++)
        pthread_create(&tid[t], NULL, worker, (void *)t);
    for (long t = 0; t < threads; t++)
        pthread_join(tid[t], NULL);
    long page = sysconf(_SC_PAGESIZE);
    char *two = mmap(NULL, 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    munmap(two + page, page);
    char *gone = mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    munmap(gone, page);
    ev_str(NULL, -1);
    ev_str((char *)1, -2);
    ev_str(gone, -3);
    memcpy(two + page - 3, "xyz", 3);
    ev_str(two + page - 3, -4);
    memcpy(two + page - 3, "ab", 3);
    ev_str(two + page - 3, -5);
    char *big = malloc(1001);
    memset(big, 'b', 1000);
    big[1000] = 0;
    ev_str(big, -6);
    if (argc > 3 && strcmp(argv[3], "wide") == 0)
        ev_wide(-0x123456789abcdefLL, "wide", -7);
    if (argc > 3 && strcmp(argv[3], "fork") == 0) {
        char side[32] = "parent-side";
        pid_t child = fork();
        if (child == 0) {
            strcpy(side, "child-side");
            ev_str(side, 100);
            _exit(0);
        }
        waitpid(child, NULL, 0);
        ev_str(side, 200);
    }
    printf("total %ld\n", total);
    return 0;
}
