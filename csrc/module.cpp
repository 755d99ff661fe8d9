// The Python module depthpro_fast._C. The ops themselves register into the torch.ops namespace
// `depthpro_fast` from their own files (TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL), so that
// `import depthpro_fast._C` is all it takes to make torch.ops.depthpro_fast.<op> available.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                          "depthpro_fast CUDA kernels (torch.ops.depthpro_fast)",
                                          -1, nullptr};
  return PyModule_Create(&module_def);
}
}
