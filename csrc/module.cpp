// The extension is loaded as a Python module only so that `import disagg._C` finds it; all
// functionality is registered as torch ops (see schema.cpp).
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
