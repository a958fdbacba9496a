/* Probed functions of the killsweep target (a file of their own so that the caller cannot
 * inline or fold them): each has several instructions, so entries and middles take a jump. */

/* straight-line arithmetic */
__attribute__((noinline)) long f_add(long a, long b) {
    long s = a + b;
    long t = s ^ (a >> 5);
    return t + (s << 1) - b;
}

/* a multiply chain */
__attribute__((noinline)) long f_mul(long a, long b) {
    long p = a * 31 + b;
    long q = p * (b | 1);
    return q - (p >> 7) + 3;
}

/* flags live across instructions (compare, then conditional moves) */
__attribute__((noinline)) long f_flags(long x, long y) {
    long r = x - y;
    long s = (x < y) ? r * 2 : r + 5;
    return s + (x == y) + ((unsigned long)x > (unsigned long)y ? 11 : 0);
}

/* a leaf keeping live data in the red zone */
__attribute__((noinline)) long f_red(long x) {
    volatile long buf[6];
    buf[0] = x; buf[1] = x + 1; buf[2] = x * 2; buf[3] = x ^ 3; buf[4] = x - 4; buf[5] = ~x;
    return buf[0] + 2 * buf[1] + 3 * buf[2] + 4 * buf[3] + 5 * buf[4] + 6 * buf[5];
}

/* calls another probed function */
__attribute__((noinline)) long f_call(long x) { return f_add(x, 7) * 2 + 1; }
