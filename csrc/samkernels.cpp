// Op schemas of the `samkernels` torch.library namespace and the Python module stub.
// Kernels register themselves per backend with TORCH_LIBRARY_IMPL (csrc/cpu/*.cpp for CPU,
// csrc/cuda/*.cpp for CUDA); other op families add schemas with TORCH_LIBRARY_FRAGMENT.
// Semantics of every op: samkernels/ops/reference.py (the executable spec).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(samkernels, m) {
  // SAM / ASAM
  m.def("grad_sumsq(Tensor[] params, Tensor[] grads, bool adaptive, float eta) -> Tensor");
  m.def("sam_perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] backups, Tensor? grad_norm, "
        "float rho, float eps, bool adaptive, float eta, Tensor? found_inf=None) -> Tensor");
  m.def("sam_restore_sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor[] backups, "
        "Tensor(b!)[] momentum_bufs, float lr, float momentum, float dampening, bool nesterov, "
        "float weight_decay, bool first, Tensor? found_inf=None) -> ()");
  m.def("sam_restore_adam_(Tensor(a!)[] params, Tensor[] grads, Tensor[] backups, "
        "Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, int step, float lr, float beta1, "
        "float beta2, float eps, float weight_decay, bool decoupled, Tensor? found_inf=None) -> ()");
  // bSAM (Algorithm 1)
  m.def("bsam_noise_(Tensor(a!)[] params, Tensor(b!)[] backups, Tensor[] precisions, "
        "int[] param_ids, int seed, int step, float num_data) -> ()");
  m.def("bsam_perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor[] backups, "
        "Tensor(b!)[] precisions, Tensor(c!)[] accums, float rho, float beta2, float delta, "
        "float gamma, Tensor? found_inf=None) -> ()");
  m.def("bsam_update_(Tensor(a!)[] params, Tensor[] grads, Tensor[] backups, "
        "Tensor(b!)[] precisions, Tensor(c!)[] momenta, Tensor[] accums, float lr, float beta1, "
        "float beta2, float delta, float gamma, float accum_scale, bool released_order, Tensor? found_inf=None) -> ()");
}

// `import samkernels._C` loads this library (running the registrations above); the module itself
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
