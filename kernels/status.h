// The error a kernels/ entry point returns (kernels/ has no Abseil: the CUDA code is built by
// nvcc without it). core/ turns it into an absl::Status.
#ifndef SPARSEKV_KERNELS_STATUS_H_
#define SPARSEKV_KERNELS_STATUS_H_

#include <string>
#include <utility>

namespace sparsekv::kernels {

struct KernelStatus {
  enum class Code {
    kOk = 0,
    kInvalidArgument,    // a plan or parameter the backend cannot run (a caller bug)
    kUnavailable,        // the device is not there or not usable now
    kResourceExhausted,  // device memory
    kInternal,           // a device error (a failed launch, a sticky CUDA error)
  };
  Code code = Code::kOk;
  std::string message;

  bool ok() const { return code == Code::kOk; }
  static KernelStatus Ok() { return {}; }
  static KernelStatus Error(Code code, std::string message) { return {code, std::move(message)}; }
};

}  // namespace sparsekv::kernels

#endif  // SPARSEKV_KERNELS_STATUS_H_
