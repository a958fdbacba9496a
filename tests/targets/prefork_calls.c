/* djprobe test target: a pre-forking localhost server whose requests each call a probed function
 * a known number of times with known arguments. Usage: prefork_calls WORKERS CALLS.
 * The parent listens on 127.0.0.1 (a free port), prints "port P", forks WORKERS workers that each
 * print "worker PID" and then accept connections in a loop: a request is 8 bytes (a long x); the
 * worker calls fl_work(x, k) for k = 0 .. CALLS-1 and answers "PID SUM\n" (SUM = the sum of the
 * results, CALLS * (3x + 1) + CALLS * (CALLS - 1) / 2). The parent then waits for EOF on stdin,
 * ends the workers still there (SIGTERM), reaps them all and prints "ended PID SIGNAL" for each
 * (the signal that ended it, 0 for a normal exit), then exits 0. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

__attribute__((noinline)) long fl_work(long x, long k) {
    __asm__ volatile("" ::: "memory");
    return 3 * x + 1 + k;
}

static void worker(int listener, long calls) {
    for (;;) {
        int fd = accept(listener, NULL, NULL);
        if (fd < 0) continue;
        long x;
        size_t got = 0;
        while (got < sizeof x) {
            ssize_t r = read(fd, (char *)&x + got, sizeof x - got);
            if (r <= 0) break;
            got += (size_t)r;
        }
        if (got == sizeof x) {
            long sum = 0;
            for (long k = 0; k < calls; k++) sum += fl_work(x, k);
            char reply[64];
            int n = snprintf(reply, sizeof reply, "%d %ld\n", (int)getpid(), sum);
            if (write(fd, reply, (size_t)n) != n) perror("write");
        }
        close(fd);
    }
}

int main(int argc, char **argv) {
    int workers = argc > 1 ? atoi(argv[1]) : 3;
    long calls = argc > 2 ? atol(argv[2]) : 4;
    if (workers < 1 || workers > 64) return 2;
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof addr;
    if (bind(listener, (struct sockaddr *)&addr, sizeof addr) || listen(listener, 128)) return 2;
    getsockname(listener, (struct sockaddr *)&addr, &len);
    printf("port %d\n", ntohs(addr.sin_port));
    fflush(stdout);
    pid_t pids[64];
    for (int i = 0; i < workers; i++) {
        pids[i] = fork();
        if (pids[i] == 0) {
            printf("worker %d\n", (int)getpid());
            fflush(stdout);
            worker(listener, calls);
        }
    }
    char line[16];
    while (fgets(line, sizeof line, stdin)) {}
    for (int i = 0; i < workers; i++) kill(pids[i], SIGTERM);
    for (int i = 0; i < workers; i++) {
        int status;
        waitpid(pids[i], &status, 0);
        printf("ended %d %d\n", (int)pids[i], WIFSIGNALED(status) ? WTERMSIG(status) : 0);
    }
    return 0;
}
