/* djprobe test plug-in (a shared library loaded with dlopen by dlhost.c): its constructor calls
 * plug_ctor_helper once per load; plug_work is the function the host calls. */
volatile long plug_ctor_calls;

__attribute__((noinline)) long plug_ctor_helper(long x) {
    __atomic_fetch_add(&plug_ctor_calls, 1, __ATOMIC_RELAXED);
    return x + 1;
}

__attribute__((noinline)) long plug_work(long x) { return x * 5 + 3; }

__attribute__((constructor)) static void plug_init(void) { plug_ctor_helper(41); }

long plug_loaded_calls(void) { return plug_ctor_calls; }
