// The activation arena: a CPU allocator that, inside a scope (lgd_fast.activation_arena()), serves large
// tensors from blocks freed earlier instead of fresh memory.
//
// Why: glibc serves a large tensor by mmap (or from heap it trims back to the system), so every fresh page
// of a new activation faults and arrives cold in the caches; a fast model allocates every activation anew on
// each call. A frozen inductor graph has the same cost; an arena of reused buffers removes it. Outside a scope
// every allocation is the previous CPU allocator's, untouched.
//
// How: installed once as the CPU allocator (c10::SetCPUAllocator, the priority of the default one), it wraps
// the allocator it replaces. While the calling thread is inside a scope, a request of at least `min_bytes`
// takes the smallest free block of the pool that holds it and is at most twice its size (best fit), else a
// new 64-byte-aligned block; freeing such a tensor, anywhere and at any time, returns its block to the pool.
// Blocks no scope has taken for `idle_scopes` outermost scopes are freed at the end of one, and release()
// frees every free block at once. Memory held by the pool is reported by stats().

#include <c10/util/Exception.h>

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <pthread.h>

#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <unordered_map>

namespace lgd_fast {
namespace {

thread_local int64_t scope_depth = 0;  // this thread's open scopes

struct Block {
  size_t bytes;
  uint64_t last_used;  // the outermost scope (generation) that last took it
};

class ActivationArena final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    if (scope_depth == 0 || nbytes < min_bytes_) {
      return base_->allocate(nbytes);
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.lower_bound(nbytes);
      if (it != free_.end() && it->first <= 2 * nbytes) {
        void* data = it->second;
        const size_t bytes = it->first;
        free_.erase(it);
        cached_bytes_ -= bytes;
        ++hits_;
        owned_.at(data).last_used = generation_;
        report(data, static_cast<int64_t>(bytes));
        return {data, data, &ActivationArena::delete_block, c10::Device(c10::DeviceType::CPU)};
      }
    }
    void* data = c10::alloc_cpu(nbytes);  // outside the lock; throws on failure, as the default allocator does
    {
      std::lock_guard<std::mutex> lock(mutex_);
      owned_[data] = Block{nbytes, generation_};
      owned_bytes_ += nbytes;
      ++misses_;
      report(data, static_cast<int64_t>(nbytes));
    }
    return {data, data, &ActivationArena::delete_block, c10::Device(c10::DeviceType::CPU)};
  }

  // raw_allocate() takes allocate()'s pointer and frees it through this: a pooled block goes back to the pool,
  // any other to the wrapped allocator's own deleter.
  c10::DeleterFnPtr raw_deleter() const override { return &ActivationArena::delete_any; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // Makes this the CPU allocator (once); true if it is the CPU allocator now.
  bool install() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (base_ == nullptr) {
      c10::Allocator* current = c10::GetCPUAllocator();
      if (current->raw_deleter() == nullptr) {
        return false;  // an allocator without a raw deleter: raw_allocate() could not be wrapped
      }
      base_ = current;
      base_raw_deleter_ = current->raw_deleter();
      c10::SetCPUAllocator(this, /*priority=*/0);
    }
    return c10::GetCPUAllocator() == this;
  }

  void enter() { ++scope_depth; }

  void exit() {
    TORCH_CHECK(scope_depth > 0, "lgd_fast activation arena: exit() without a matching enter()");
    if (--scope_depth == 0) {
      std::lock_guard<std::mutex> lock(mutex_);
      ++generation_;
      trim(idle_scopes_);
    }
  }

  // Fills every free block with 0xFF bytes (NaN in float32, bfloat16 and float16): a test that a tensor taken
  // from the pool is written everywhere before it is read.
  void poison() {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& [bytes, data] : free_) {
      std::memset(data, 0xFF, bytes);
    }
  }

  int64_t release() {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(trim(0));
  }

  void configure(int64_t min_bytes, int64_t idle_scopes) {
    TORCH_CHECK(min_bytes >= 0, "lgd_fast activation arena: min_bytes must be >= 0, got ", min_bytes);
    TORCH_CHECK(idle_scopes >= 1, "lgd_fast activation arena: idle_scopes must be >= 1, got ", idle_scopes);
    std::lock_guard<std::mutex> lock(mutex_);
    min_bytes_ = static_cast<size_t>(min_bytes);
    idle_scopes_ = static_cast<uint64_t>(idle_scopes);
  }

  std::unordered_map<std::string, int64_t> stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {
        {"installed", static_cast<int64_t>(base_ != nullptr && c10::GetCPUAllocator() == this)},
        {"owned_bytes", static_cast<int64_t>(owned_bytes_)},
        {"cached_bytes", static_cast<int64_t>(cached_bytes_)},
        {"blocks", static_cast<int64_t>(owned_.size())},
        {"free_blocks", static_cast<int64_t>(free_.size())},
        {"hits", static_cast<int64_t>(hits_)},
        {"misses", static_cast<int64_t>(misses_)},
        {"scopes", static_cast<int64_t>(generation_)},
        {"min_bytes", static_cast<int64_t>(min_bytes_)},
        {"idle_scopes", static_cast<int64_t>(idle_scopes_)},
    };
  }

  std::mutex mutex_;  // public for the fork handlers

 private:
  static void delete_block(void* data);
  static void delete_any(void* data);
  void give_back(void* data);  // a block in use back to the free list; the caller holds the lock

  // Frees the free blocks not taken in the last `idle` generations (every free block for 0); the bytes freed.
  size_t trim(uint64_t idle) {
    size_t freed = 0;
    for (auto it = free_.begin(); it != free_.end();) {
      auto block = owned_.find(it->second);
      if (idle == 0 || block->second.last_used + idle < generation_) {
        freed += block->second.bytes;
        c10::free_cpu(it->second);
        owned_.erase(block);
        it = free_.erase(it);
      } else {
        ++it;
      }
    }
    owned_bytes_ -= freed;
    cached_bytes_ -= freed;
    return freed;
  }

  void report(void* data, int64_t bytes) {
    if (c10::memoryProfilingEnabled()) {
      c10::reportMemoryUsageToProfiler(data, bytes, owned_bytes_ - cached_bytes_, owned_bytes_,
                                       c10::Device(c10::DeviceType::CPU));
    }
  }

  c10::Allocator* base_ = nullptr;
  c10::DeleterFnPtr base_raw_deleter_ = nullptr;
  std::multimap<size_t, void*> free_;           // free blocks by size
  std::unordered_map<void*, Block> owned_;      // every block of the pool, free or in use
  size_t owned_bytes_ = 0, cached_bytes_ = 0;   // all blocks; the free ones
  uint64_t hits_ = 0, misses_ = 0, generation_ = 0;
  size_t min_bytes_ = 64 * 1024;  // smaller tensors stay in the heap, which reuses them without faults
  uint64_t idle_scopes_ = 256;
};

// Never destroyed: tensors may outlive every static (their deleters run at interpreter exit).
ActivationArena& arena() {
  static ActivationArena* instance = [] {
    auto* made = new ActivationArena();
    // A fork (DataLoader workers) while another thread holds the lock would leave the child's locked forever.
    pthread_atfork([] { arena().mutex_.lock(); }, [] { arena().mutex_.unlock(); }, [] { arena().mutex_.unlock(); });
    return made;
  }();
  return *instance;
}

void ActivationArena::give_back(void* data) {
  const Block& block = owned_.at(data);
  free_.emplace(block.bytes, data);
  cached_bytes_ += block.bytes;
  report(data, -static_cast<int64_t>(block.bytes));
}

void ActivationArena::delete_block(void* data) {
  ActivationArena& self = arena();
  std::lock_guard<std::mutex> lock(self.mutex_);
  self.give_back(data);
}

void ActivationArena::delete_any(void* data) {
  ActivationArena& self = arena();
  {
    std::lock_guard<std::mutex> lock(self.mutex_);
    if (self.owned_.count(data) > 0) {
      self.give_back(data);
      return;
    }
  }
  if (data != nullptr) {
    self.base_raw_deleter_(data);
  }
}

}  // namespace

bool arena_install() { return arena().install(); }
void arena_enter() { arena().enter(); }
void arena_exit() { arena().exit(); }
int64_t arena_release() { return arena().release(); }
void arena_poison() { arena().poison(); }
void arena_configure(int64_t min_bytes, int64_t idle_scopes) { arena().configure(min_bytes, idle_scopes); }
std::unordered_map<std::string, int64_t> arena_stats() { return arena().stats(); }

}  // namespace lgd_fast
