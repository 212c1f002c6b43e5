// The Python module stub of the extension.  The op schemas of the `samkernels` namespace are
// defined in Python from the op table (its rows sit on the reference functions in
// samkernels/ops/reference.py; samkernels/ops/_library.py defines them); the kernels only register
// implementations with TORCH_LIBRARY_IMPL (csrc/ops/<family>.cpp: CPU, and CUDA in CUDA builds).
// Semantics of every op: its reference function.
#include <Python.h>

// `import samkernels._C` loads this library (running the kernels' registrations); the module itself
// only says whether CUDA kernels were compiled in.
static PyObject* has_cuda(PyObject*, PyObject*) {
#ifdef SAMKERNELS_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

static PyMethodDef kMethods[] = {
    {"has_cuda", has_cuda, METH_NOARGS, "True when the CUDA kernels were compiled in."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, kMethods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
