// Host check of csrc/philox.cuh (__host__ __device__), built with nvcc and
// driven by tests/test_philox_uniform.py: reads lines
// "seed offset stream position index" and prints uniform(...) of each.
#include <cstdio>
#include <cstdint>
#include "philox.cuh"
int main() {
  long long seed, offset; unsigned stream, position; unsigned long long index;
  while (std::scanf("%lld %lld %u %u %llu", &seed, &offset, &stream, &position, &index) == 5) {
    float u = dspark::uniform((uint64_t)seed, (uint64_t)offset, stream, position, index);
    std::printf("%.9e\n", u);
  }
  return 0;
}
