#ifndef MERGEGUARD_CORE_THREAD_POOL_H_
#define MERGEGUARD_CORE_THREAD_POOL_H_

#include <cstddef>
#include <deque>
#include <functional>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"

namespace mergeguard {

// ThreadPool runs closures on a fixed set of threads. The destructor finishes
// queued work, then joins.
class ThreadPool {
 public:
  // `num_threads` of 0 means std::thread::hardware_concurrency().
  explicit ThreadPool(size_t num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  // Schedule queues `fn`.
  void Schedule(std::function<void()> fn);
  // Wait blocks until every scheduled closure has finished.
  void Wait();
  size_t size() const { return threads_.size(); }

 private:
  void WorkerLoop();

  absl::Mutex mu_;
  std::deque<std::function<void()>> queue_ ABSL_GUARDED_BY(mu_);
  size_t in_flight_ ABSL_GUARDED_BY(mu_) = 0;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

// ParallelFor runs fn(i) for i in [0, n) on up to `num_threads` threads
// (0 = hardware concurrency) and returns when all are done.
void ParallelFor(size_t n, size_t num_threads,
                 const std::function<void(size_t)>& fn);

}  // namespace mergeguard

#endif  // MERGEGUARD_CORE_THREAD_POOL_H_
