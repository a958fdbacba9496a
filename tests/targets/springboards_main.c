/* Drives tests/targets/springboards.S: springboards_main N prints sb_near(N). */
#include <stdio.h>
#include <stdlib.h>

long sb_near(int n);
long sb_fall(int n);
long sb_inner(int n);

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 3;
    printf("%ld %ld\n", sb_near(n), sb_inner(n));
    return 0;
}
