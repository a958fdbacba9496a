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
 *   path_exit(x)      returns 1 if x > 0, else 2, both through a shared `pop ebx; ret` that
 *                     starts 2 bytes before its ret: a return probe needs path windows there
 *
 *   i386 run T N      T threads each call every function N times; prints one line per function
 *                     with the sums (the same in every run: the output a probe must not change)
 *   i386 wait T N     prints "ready <pid>", waits for a line on stdin, then runs as `run`,
 *                     prints "done" and waits for another line (or the end of stdin) to exit
 *   i386 malloc T N   starts T threads, prints "ready <pid>", waits for a line; then each thread
 *                     calls malloc and free N times (nothing else calls them meanwhile: the
 *                     threads exist and stdout's buffer was allocated before "ready"), prints
 *                     "mallocs <T*N>" and "done"
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
int path_exit(int x);

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
    ".size esp_entry, .-esp_entry\n"
    ".globl path_exit\n"
    ".type path_exit, @function\n"
    "path_exit:\n"
    "    pushl %ebx\n"
    "    movl 8(%esp), %ebx\n"
    "    testl %ebx, %ebx\n"
    "    jle 1f\n"
    "    movl $1, %eax\n"
    "    jmp 2f\n"
    "1:  movl $2, %eax\n"
    "2:  popl %ebx\n"
    "    ret\n"
    ".size path_exit, .-path_exit\n");

__attribute__((noinline, used)) unsigned long long wide(unsigned x) {
    __asm__ volatile("" ::: "memory");
    return ((unsigned long long)(x * 3u) << 32) | (x ^ 0xa5a5a5a5u);
}

static long n_calls;

struct sums {
    long long thunk, jcc, esp, path;
    unsigned long long wide;
};

static void *worker(void *arg) {
    struct sums *s = arg;
    for (long i = 0; i < n_calls; i++) {
        s->thunk += thunk_entry((int)i);
        s->jcc += call_jcc((int)(i % 3 == 0 ? -i : i));
        s->esp += esp_entry((int)i, 7);
        s->wide += wide((unsigned)i);
        s->path += path_exit((int)(i % 5) - 2);
    }
    return NULL;
}

static void run(int threads) {
    pthread_t tids[64];
    struct sums sums[64];
    memset(sums, 0, sizeof sums);
    for (int t = 0; t < threads; t++) pthread_create(&tids[t], NULL, worker, &sums[t]);
    struct sums all = {0, 0, 0, 0, 0};
    for (int t = 0; t < threads; t++) {
        pthread_join(tids[t], NULL);
        all.thunk += sums[t].thunk;
        all.jcc += sums[t].jcc;
        all.esp += sums[t].esp;
        all.wide += sums[t].wide;
        all.path += sums[t].path;
    }
    printf("thunk_entry %lld\njcc_entry %lld\nesp_entry %lld\nwide %llu\npath_exit %lld\n", all.thunk, all.jcc,
           all.esp, all.wide, all.path);
    fflush(stdout);
}

static pthread_mutex_t go_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t go_cond = PTHREAD_COND_INITIALIZER;
static int go;

static void *mallocer(void *arg) {
    pthread_mutex_lock(&go_lock);
    while (!go) pthread_cond_wait(&go_cond, &go_lock);
    pthread_mutex_unlock(&go_lock);
    for (long i = 0; i < n_calls; i++) {
        void *volatile p = malloc(16 + (i & 255));
        free(p);
    }
    *(long *)arg = n_calls;
    return NULL;
}

static int run_mallocs(int threads) {
    pthread_t tids[64];
    long done[64];
    for (int t = 0; t < threads; t++) pthread_create(&tids[t], NULL, mallocer, &done[t]);
    printf("ready %d\n", getpid());
    fflush(stdout);
    char c;  /* read(2), not stdio: stdin's buffer would be a malloc after "ready" */
    do {
        if (read(0, &c, 1) != 1) return 3;
    } while (c != '\n');
    pthread_mutex_lock(&go_lock);
    go = 1;
    pthread_cond_broadcast(&go_cond);
    pthread_mutex_unlock(&go_lock);
    long total = 0;
    for (int t = 0; t < threads; t++) {
        pthread_join(tids[t], NULL);
        total += done[t];
    }
    printf("mallocs %ld\ndone\n", total);
    fflush(stdout);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 4) return 2;
    int threads = atoi(argv[2]);
    if (threads < 1 || threads > 64) return 2;
    n_calls = atol(argv[3]);
    if (strcmp(argv[1], "malloc") == 0) return run_mallocs(threads);
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
        char line[64];  /* stays until a second line, or end of input */
        if (!fgets(line, sizeof line, stdin)) return 0;
    }
    return 0;
}
