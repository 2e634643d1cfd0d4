// glcic_fast._C is a Python module only so that `import glcic_fast._C` loads this shared
// library: its static initialisers (TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL in csrc/ops/)
// register the glcic_fast:: operators with torch, which exposes them as torch.ops.glcic_fast.*.
// The module itself defines nothing, so it needs no pybind11 (and none of its compile time).
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
