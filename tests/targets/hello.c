/* djprobe test target: prints at the start of main, then exits with status 7. */
#include <stdio.h>
#include <unistd.h>
int main(int argc, char **argv) {
    (void)!write(1, "main\n", 5);
    printf("args %d\n", argc);
    return 7;
}
