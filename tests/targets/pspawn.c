/* djprobe test target: posix_spawn's argv[1] with arguments "7 0" (a forkcount that calls
 * fc_work 14 times and forks nothing), waits for it, prints "spawned STATUS". */
#include <spawn.h>
#include <stdio.h>
#include <sys/wait.h>
extern char **environ;
int main(int argc, char **argv) {
    pid_t pid;
    int st;
    char *args[] = {argv[1], "7", "0", NULL};
    if (argc < 2 || posix_spawn(&pid, argv[1], NULL, NULL, args, environ)) return 2;
    waitpid(pid, &st, 0);
    printf("spawned %d\n", WEXITSTATUS(st));
    return 0;
}
