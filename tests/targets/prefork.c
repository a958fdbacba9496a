/* djprobe test target: a pre-forking localhost server. Usage: prefork WORKERS.
 * The parent listens on 127.0.0.1 (a free port), prints "port P", forks WORKERS workers that each
 * print "worker PID" and then accept connections in a loop: a request is 8 bytes (a long x); the
 * worker calls handle_request(x) and answers "PID RESULT\n". The parent then waits for EOF on stdin, ends the workers (SIGTERM) and exits
 * 0 when each of them ended by that signal. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

__attribute__((noinline)) long handle_request(long x) { return x * 11 + 5; }

static void worker(int listener) {
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
            char reply[64];
            int n = snprintf(reply, sizeof reply, "%d %ld\n", (int)getpid(), handle_request(x));
            if (write(fd, reply, (size_t)n) != n) perror("write");
        }
        close(fd);
    }
}

int main(int argc, char **argv) {
    int workers = argc > 1 ? atoi(argv[1]) : 3;
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof addr;
    if (bind(listener, (struct sockaddr *)&addr, sizeof addr) || listen(listener, 128)) return 2;
    getsockname(listener, (struct sockaddr *)&addr, &len);
    printf("port %d\n", ntohs(addr.sin_port));
    fflush(stdout);
    pid_t pids[64];
    for (int i = 0; i < workers && i < 64; i++) {
        pids[i] = fork();
        if (pids[i] == 0) {
            printf("worker %d\n", (int)getpid());
            fflush(stdout);
            worker(listener);
        }
    }
    char line[16];
    while (fgets(line, sizeof line, stdin)) {}
    int ok = 1;
    for (int i = 0; i < workers; i++) kill(pids[i], SIGTERM);
    for (int i = 0; i < workers; i++) {
        int status;
        waitpid(pids[i], &status, 0);
        if (!WIFSIGNALED(status) || WTERMSIG(status) != SIGTERM) ok = 0;
    }
    return ok ? 0 : 3;
}
