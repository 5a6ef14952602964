#include "core/thread_pool.h"

#include <atomic>
#include <set>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "gtest/gtest.h"

namespace mergeguard {
namespace {

TEST(ThreadPoolTest, RunsEveryClosureBeforeWaitReturns) {
  ThreadPool pool(3);
  EXPECT_EQ(pool.size(), 3u);
  std::atomic<int> sum{0};
  for (int i = 1; i <= 100; ++i) {
    pool.Schedule([&sum, i] { sum += i; });
  }
  pool.Wait();
  EXPECT_EQ(sum.load(), 5050);
}

TEST(ThreadPoolTest, DestructorDrainsTheQueue) {
  std::atomic<int> done{0};
  {
    ThreadPool pool(1);
    for (int i = 0; i < 20; ++i) pool.Schedule([&done] { ++done; });
  }
  EXPECT_EQ(done.load(), 20);
}

TEST(ThreadPoolTest, UsesSeveralThreads) {
  ThreadPool pool(2);
  absl::Mutex mu;
  int arrived = 0;
  std::set<std::thread::id> ids;
  // Both closures must run at once to get past the barrier.
  for (int i = 0; i < 2; ++i) {
    pool.Schedule([&] {
      absl::MutexLock lock(&mu);
      ++arrived;
      ids.insert(std::this_thread::get_id());
      mu.Await(absl::Condition(
          +[](int* n) { return *n == 2; }, &arrived));
    });
  }
  pool.Wait();
  EXPECT_EQ(ids.size(), 2u);
}

TEST(ParallelForTest, VisitsEachIndexOnce) {
  for (size_t threads : {0u, 1u, 4u}) {
    std::vector<std::atomic<int>> hits(257);
    ParallelFor(hits.size(), threads, [&](size_t i) { ++hits[i]; });
    for (size_t i = 0; i < hits.size(); ++i) {
      ASSERT_EQ(hits[i].load(), 1) << "index " << i << ", threads " << threads;
    }
  }
  ParallelFor(0, 4, [](size_t) { FAIL() << "called for n = 0"; });
}

}  // namespace
}  // namespace mergeguard
