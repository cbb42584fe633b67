// lgd_fast._C_cuda: the CUDA extension module. Its kernels register themselves for the CUDA dispatch key
// of the schemas that lgd_fast._C defines (TORCH_LIBRARY_IMPL only, never TORCH_LIBRARY, here); import it
// after lgd_fast._C, as lgd_fast.ops._backend.load_cuda_extension does.

#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lgd_fast compiled CUDA kernels; reached through torch.ops.lgd_fast.* on CUDA tensors";
}
