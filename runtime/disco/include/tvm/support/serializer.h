// Stand-in for a TVM header the apache-tvm wheel does not ship; see io.h next to it.
#ifndef KILN_TVM_SUPPORT_SERIALIZER_SHIM_H_
#define KILN_TVM_SUPPORT_SERIALIZER_SHIM_H_

#include <tvm/ffi/endian.h>
#include <tvm/support/io.h>

#endif  // KILN_TVM_SUPPORT_SERIALIZER_SHIM_H_
