/* djprobe test target: posix_spawn of argv[1] with arguments "7 0" (a forkcount that calls
 * fc_work 14 times) and DUPS dup2 file actions, which the spawn child runs before its exec.
 * The parent never calls dup2 itself. Prints "spawned STATUS". Usage: pspawn_dup EXE DUPS. */
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
extern char **environ;
int main(int argc, char **argv) {
    pid_t pid;
    int st;
    if (argc < 3) return 2;
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    for (int i = 0; i < atoi(argv[2]); i++) posix_spawn_file_actions_adddup2(&actions, 2, 10 + i);
    char *args[] = {argv[1], "7", "0", NULL};
    if (posix_spawn(&pid, argv[1], &actions, NULL, args, environ)) return 2;
    waitpid(pid, &st, 0);
    printf("spawned %d\n", WEXITSTATUS(st));
    return 0;
}
