// Stand-in for a TVM header the apache-tvm wheel does not ship.
//
// The wheel's tvm/runtime/tensor.h (pulled in by tvm/runtime/disco/*.h) includes
// <tvm/support/io.h> for the inline Tensor::Save/Load, which Kiln's Disco backend never calls.
// Declaring the stream interface they name is enough for them to compile; nothing here is
// defined, so any real use would fail to link rather than misbehave.
#ifndef KILN_TVM_SUPPORT_IO_SHIM_H_
#define KILN_TVM_SUPPORT_IO_SHIM_H_

#include <cstddef>

namespace tvm {
namespace support {

class Stream {
 public:
  virtual ~Stream() = default;
  virtual size_t Read(void* ptr, size_t size) = 0;
  virtual size_t Write(const void* ptr, size_t size) = 0;
  template <typename T>
  void Write(const T& value);
  template <typename T>
  void WriteArray(const T* values, size_t num);
  template <typename T>
  bool Read(T* out);
  template <typename T>
  bool ReadArray(T* out, size_t num);
};

}  // namespace support
}  // namespace tvm

#endif  // KILN_TVM_SUPPORT_IO_SHIM_H_
