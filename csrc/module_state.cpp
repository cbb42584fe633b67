// lgd_fast._C.module_state: what lgd_fast.recorded.module_state reads (the guard of a recorded program: every
// submodule's stamp, class, instance forward, training flag, plan and hooks, its parameters' and buffers' objects,
// versions and memory, and the global module hooks), packed as int64 values into one bytes object: two calls give
// equal bytes exactly where the Python function gives equal tuples (objects by their addresses, as id() gives them;
// a module is alive while guarded, so its class and forward are too). The Python function is the specification
// (and what runs where this returns NotImplemented); this is what a recorded call pays: the guard walks every module
// and tensor of the model on every call, about 100 us in Python for lgd3d_tiny and 350-400 us for R50.
//
// Returns None where a tensor's version cannot be read (inference tensors), as the Python function does, and
// NotImplemented where it would have to do what only the Python function does (give a module its first stamp) or
// meets what it does not read the same way (a parameter or buffer that is not a torch.Tensor, a hook key that is
// not an int).

#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <cstdint>
#include <vector>

namespace py = pybind11;

namespace lgd_fast {

namespace {

// The attribute names read, interned once (PyDict_GetItemString would make and hash a new string per lookup).
struct Keys {
  PyObject *stamp, *training, *parameters, *buffers, *modules, *forward, *plan, *hooks, *pre_hooks;
};
const Keys& keys() {
  static const Keys k{PyUnicode_InternFromString("_lgd_stamp"), PyUnicode_InternFromString("training"),
                      PyUnicode_InternFromString("_parameters"), PyUnicode_InternFromString("_buffers"),
                      PyUnicode_InternFromString("_modules"), PyUnicode_InternFromString("forward"),
                      PyUnicode_InternFromString("_lgd_plan"), PyUnicode_InternFromString("_forward_hooks"),
                      PyUnicode_InternFromString("_forward_pre_hooks")};
  return k;
}

// d[key] (a borrowed reference), or nullptr if absent.
PyObject* item(PyObject* d, PyObject* key) { return PyDict_GetItemWithError(d, key); }

// Appends the count and the keys of a hooks dict (handle ids, ints); false if it is not a dict of int keys.
bool add_keys(std::vector<int64_t>& out, PyObject* o) {
  if (o == nullptr || !PyDict_Check(o)) return false;
  out.push_back(PyDict_Size(o));
  PyObject *key, *value;
  Py_ssize_t pos = 0;
  while (PyDict_Next(o, &pos, &key, &value)) {
    if (!PyLong_Check(key)) return false;
    out.push_back(PyLong_AsLongLong(key));
  }
  return !PyErr_Occurred();
}

int64_t address(const void* p) { return static_cast<int64_t>(reinterpret_cast<intptr_t>(p)); }

}  // namespace

py::object module_state(py::handle module) {
  const auto not_here = [] { return py::reinterpret_borrow<py::object>(Py_NotImplemented); };
  std::vector<int64_t> out;
  out.reserve(4096);
  const Keys& k = keys();
  std::vector<PyObject*> stack{module.ptr()};
  while (!stack.empty()) {
    PyObject* m = stack.back();
    stack.pop_back();
    PyObject** dict_ptr = _PyObject_GetDictPtr(m);
    PyObject* d = dict_ptr == nullptr ? nullptr : *dict_ptr;
    if (d == nullptr || !PyDict_Check(d)) return not_here();
    PyObject* stamp = item(d, k.stamp);
    PyObject* training = item(d, k.training);
    PyObject* params = item(d, k.parameters);
    PyObject* buffers = item(d, k.buffers);
    PyObject* children = item(d, k.modules);
    if (stamp == nullptr || !PyLong_Check(stamp) || training == nullptr || params == nullptr || buffers == nullptr ||
        children == nullptr || !PyDict_Check(params) || !PyDict_Check(buffers) || !PyDict_Check(children)) {
      return not_here();  // (a module's first stamp: the Python function gives it)
    }
    out.push_back(PyLong_AsLongLong(stamp));
    out.push_back(address(Py_TYPE(m)));
    PyObject* forward = item(d, k.forward);
    out.push_back(address(forward ? forward : Py_None));
    out.push_back(PyObject_IsTrue(training));
    PyObject* plan = item(d, k.plan);
    out.push_back(address(plan ? plan : Py_None));
    if (!add_keys(out, item(d, k.hooks)) || !add_keys(out, item(d, k.pre_hooks))) {
      PyErr_Clear();
      return not_here();
    }
    for (PyObject* tensors : {params, buffers}) {
      PyObject *key, *value;
      Py_ssize_t pos = 0;
      while (PyDict_Next(tensors, &pos, &key, &value)) {
        if (value == Py_None) {
          out.push_back(0);  // (a None slot: set to a tensor later is a change)
          continue;
        }
        if (!THPVariable_Check(value)) return not_here();
        const at::Tensor& t = THPVariable_Unpack(value);
        if (t.is_inference()) return py::none();  // "Inference tensors do not track version counter"
        out.push_back(address(value));
        out.push_back(static_cast<int64_t>(t._version()));
        out.push_back(address(t.data_ptr()));
      }
    }
    out.push_back(-1);  // (the end of one module's entries)
    PyObject *key, *child;
    Py_ssize_t pos = 0;
    while (PyDict_Next(children, &pos, &key, &child)) {
      if (child != Py_None) stack.push_back(child);
    }
  }
  py::module_ nn_module = py::module_::import("torch.nn.modules.module");
  for (const char* name : {"_global_forward_hooks", "_global_forward_pre_hooks"}) {
    if (!add_keys(out, nn_module.attr(name).ptr())) {
      PyErr_Clear();
      return not_here();
    }
  }
  return py::bytes(reinterpret_cast<const char*>(out.data()), out.size() * sizeof(int64_t));
}

}  // namespace lgd_fast
