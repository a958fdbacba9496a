// C++ exceptions thrown through probed functions (tests/live/test_returns.py).
// usage: returns_eh N THREADS -- each thread calls middle(i) N times; i % 4 == 0 throws.
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <thread>
#include <vector>

volatile int sink;

struct Guard {
    ~Guard() { sink = sink + 1; }  // a cleanup landing pad in middle()
};

__attribute__((noinline)) int thrower(int n) {
    if (n % 4 == 0)
        throw std::runtime_error("four");
    sink = n;
    return n * 2;
}

__attribute__((noinline)) int middle(int n) {
    Guard g;
    int r = thrower(n);
    sink = r;
    return r + 1;
}

int main(int argc, char **argv) {
    if (argc < 3)
        return 2;
    int n = atoi(argv[1]), threads = atoi(argv[2]);
    std::vector<long> sums(threads), caught(threads);
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; t++)
        pool.emplace_back([&, t] {
            for (int i = 0; i < n; i++) {
                try {
                    sums[t] += middle(i);
                } catch (const std::runtime_error &) {
                    caught[t]++;
                }
            }
        });
    long total = 0, total_caught = 0;
    for (int t = 0; t < threads; t++) {
        pool[t].join();
        total += sums[t];
        total_caught += caught[t];
    }
    printf("total=%ld caught=%ld\n", total, total_caught);
    return 0;
}
