/* djprobe test target for 32-bit (i386) code, built with gcc -m32 (PIE and non-PIE).
 *
 * Functions whose first instructions are the shapes a 32-bit relocator must get right, written in
 * assembly so that their bytes do not depend on the compiler:
 *   thunk_entry(x)    starts with `call djp_get_pc_thunk_cx` (a PC thunk: it reads its return
 *                     address) and returns g_base + x, g_base read GOT-relative through ecx
 *   jcc_entry()       starts with a short `js`: returns -1 if the caller's flags say negative
 *                     (called through call_jcc(x), which sets them with `test`), else 1
 *   esp_entry(a, b)   starts with `mov eax, [esp+4]`: returns a + b
 *   wide(x)           C: a 64-bit value returned in edx:eax
 *
 *   i386 run T N      T threads each call every function N times; prints one line per function
 *                     with the sums (the same in every run: the output a probe must not change)
 *   i386 wait T N     prints "ready <pid>", waits for a line on stdin, then runs as `run` and
 *                     prints "done"
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int g_base = 1000;

int thunk_entry(int x);
int call_jcc(int x);
int esp_entry(int a, int b);

__asm__(
    ".text\n"
    ".globl djp_get_pc_thunk_cx\n"
    ".type djp_get_pc_thunk_cx, @function\n"
    "djp_get_pc_thunk_cx:\n"
    "    movl (%esp), %ecx\n"
    "    ret\n"
    ".size djp_get_pc_thunk_cx, .-djp_get_pc_thunk_cx\n"
    ".globl thunk_entry\n"
    ".type thunk_entry, @function\n"
    "thunk_entry:\n"
    "    call djp_get_pc_thunk_cx\n"
    "    addl $_GLOBAL_OFFSET_TABLE_, %ecx\n"
    "    movl g_base@GOTOFF(%ecx), %eax\n"
    "    addl 4(%esp), %eax\n"
    "    ret\n"
    ".size thunk_entry, .-thunk_entry\n"
    ".globl jcc_entry\n"
    ".type jcc_entry, @function\n"
    "jcc_entry:\n"
    "    js 1f\n"
    "    movl $1, %eax\n"
    "    ret\n"
    "1:  movl $-1, %eax\n"
    "    ret\n"
    ".size jcc_entry, .-jcc_entry\n"
    ".globl call_jcc\n"
    ".type call_jcc, @function\n"
    "call_jcc:\n"
    "    movl 4(%esp), %eax\n"
    "    testl %eax, %eax\n"
    "    call jcc_entry\n"
    "    ret\n"
    ".size call_jcc, .-call_jcc\n"
    ".globl esp_entry\n"
    ".type esp_entry, @function\n"
    "esp_entry:\n"
    "    movl 4(%esp), %eax\n"
    "    addl 8(%esp), %eax\n"
    "    ret\n"
    ".size esp_entry, .-esp_entry\n");

__attribute__((noinline, used)) unsigned long long wide(unsigned x) {
    __asm__ volatile("" ::: "memory");
    return ((unsigned long long)(x * 3u) << 32) | (x ^ 0xa5a5a5a5u);
}

static long n_calls;

struct sums {
    long long thunk, jcc, esp;
    unsigned long long wide;
};

static void *worker(void *arg) {
    struct sums *s = arg;
    for (long i = 0; i < n_calls; i++) {
        s->thunk += thunk_entry((int)i);
        s->jcc += call_jcc((int)(i % 3 == 0 ? -i : i));
        s->esp += esp_entry((int)i, 7);
        s->wide += wide((unsigned)i);
    }
    return NULL;
}

static void run(int threads) {
    pthread_t tids[64];
    struct sums sums[64];
    memset(sums, 0, sizeof sums);
    for (int t = 0; t < threads; t++) pthread_create(&tids[t], NULL, worker, &sums[t]);
    struct sums all = {0, 0, 0, 0};
    for (int t = 0; t < threads; t++) {
        pthread_join(tids[t], NULL);
        all.thunk += sums[t].thunk;
        all.jcc += sums[t].jcc;
        all.esp += sums[t].esp;
        all.wide += sums[t].wide;
    }
    printf("thunk_entry %lld\njcc_entry %lld\nesp_entry %lld\nwide %llu\n", all.thunk, all.jcc, all.esp, all.wide);
    fflush(stdout);
}

int main(int argc, char **argv) {
    if (argc < 4) return 2;
    int threads = atoi(argv[2]);
    if (threads < 1 || threads > 64) return 2;
    n_calls = atol(argv[3]);
    if (strcmp(argv[1], "wait") == 0) {
        printf("ready %d\n", getpid());
        fflush(stdout);
        char line[64];
        if (!fgets(line, sizeof line, stdin)) return 3;
    }
    run(threads);
    if (strcmp(argv[1], "wait") == 0) {
        printf("done\n");
        fflush(stdout);
    }
    return 0;
}
