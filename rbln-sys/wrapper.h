/*
 * rbln-sys: the subset of librbln.so (RBLN runtime, rebel-compiler <= 0.12, ABI 6) that
 * kvrelay calls, written for this crate from the signatures in the kvrelay research notes
 * (docs/reference rbln.md section 6.3) and the mangled names torch-rbln 0.12.0 imports.
 * Not a vendor header.
 *
 * Everything is declared as a function-pointer type plus the symbol name it is resolved
 * by, because the library is opened with dlopen at run time and most of these functions
 * are C++ functions in namespace rbln, found by their Itanium-mangled names. All their
 * parameters are integers or references; a C++ reference `T&` is passed as a `T*`.
 *
 * bindgen turns this file into src/bindings.rs (feature `bindgen`; see build.rs).
 */
#include <stdint.h>

/** RBLNRetCode is a C enum (int-sized). */
typedef int32_t RBLNRetCode;
#define RBLNRetCode_SUCCESS 0
#define RBLNRetCode_FAILURE 1
#define RBLNRetCode_INVALID 2

/** The ABI number this crate's declarations were written for (torch-rbln 0.12.0). */
#define RBLN_SYS_BUILT_ABI 6

/* ---- extern "C" symbols ------------------------------------------------------------------- */

/** uint32_t rbln_abi_current(void): the newest ABI the runtime implements. */
typedef uint32_t (*rbln_abi_current_fn)(void);
#define RBLN_SYM_ABI_CURRENT "rbln_abi_current"

/** uint32_t rbln_abi_min_supported(void): the oldest ABI the runtime still implements. */
typedef uint32_t (*rbln_abi_min_supported_fn)(void);
#define RBLN_SYM_ABI_MIN_SUPPORTED "rbln_abi_min_supported"

/** RBLNRetCode rbln_get_device_count(int* count): physical NPU count. */
typedef RBLNRetCode (*rbln_get_device_count_fn)(int32_t *count);
#define RBLN_SYM_GET_DEVICE_COUNT "rbln_get_device_count"

/* ---- C++ symbols in namespace rbln -------------------------------------------------------- */

/** rbln::rbln_malloc_eager(unsigned int device, unsigned long size, unsigned long& vaddr):
 * a vmem entry with device memory allocated now. */
typedef RBLNRetCode (*rbln_malloc_eager_fn)(uint32_t device, uint64_t size, uint64_t *vaddr);
#define RBLN_SYM_MALLOC_EAGER "_ZN4rbln17rbln_malloc_eagerEjmRm"

/** rbln::rbln_malloc_lazy(unsigned int device, unsigned long size, unsigned long& vaddr):
 * a vmem entry whose device memory materializes on first device use. */
typedef RBLNRetCode (*rbln_malloc_lazy_fn)(uint32_t device, uint64_t size, uint64_t *vaddr);
#define RBLN_SYM_MALLOC_LAZY "_ZN4rbln16rbln_malloc_lazyEjmRm"

/** rbln::rbln_free(unsigned long vaddr) */
typedef RBLNRetCode (*rbln_free_fn)(uint64_t vaddr);
#define RBLN_SYM_FREE "_ZN4rbln9rbln_freeEm"

/** rbln::rbln_memcpy_h2v(unsigned long src_host, unsigned long dst_vaddr, unsigned long size):
 * synchronous host to device. */
typedef RBLNRetCode (*rbln_memcpy_h2v_fn)(uint64_t src_host, uint64_t dst_vaddr, uint64_t size);
#define RBLN_SYM_MEMCPY_H2V "_ZN4rbln15rbln_memcpy_h2vEmmm"

/** rbln::rbln_memcpy_v2h(unsigned long src_vaddr, unsigned long dst_host, unsigned long size):
 * synchronous device to host. */
typedef RBLNRetCode (*rbln_memcpy_v2h_fn)(uint64_t src_vaddr, uint64_t dst_host, uint64_t size);
#define RBLN_SYM_MEMCPY_V2H "_ZN4rbln15rbln_memcpy_v2hEmmm"

/** rbln::rbln_memcpy_v2v(unsigned long src_vaddr, unsigned long dst_vaddr, unsigned long size):
 * synchronous, same device only. */
typedef RBLNRetCode (*rbln_memcpy_v2v_fn)(uint64_t src_vaddr, uint64_t dst_vaddr, uint64_t size);
#define RBLN_SYM_MEMCPY_V2V "_ZN4rbln15rbln_memcpy_v2vEmmm"

/** rbln::rbln_memcpy_h2v_async(unsigned long src_host, unsigned long dst_vaddr,
 * unsigned long size, unsigned long* handle): handle 0 means the runtime copied
 * synchronously (unmaterialized vmem); otherwise the copy lands by rbln_device_synchronize. */
typedef RBLNRetCode (*rbln_memcpy_h2v_async_fn)(uint64_t src_host, uint64_t dst_vaddr,
                                                uint64_t size, uint64_t *handle);
#define RBLN_SYM_MEMCPY_H2V_ASYNC "_ZN4rbln21rbln_memcpy_h2v_asyncEmmmPm"

/** rbln::rbln_memcpy_v2h_async(unsigned long src_vaddr, unsigned long dst_host,
 * unsigned long size, unsigned long* handle): the host bytes are valid only after
 * rbln_device_synchronize (no automatic drain on host read). */
typedef RBLNRetCode (*rbln_memcpy_v2h_async_fn)(uint64_t src_vaddr, uint64_t dst_host,
                                                uint64_t size, uint64_t *handle);
#define RBLN_SYM_MEMCPY_V2H_ASYNC "_ZN4rbln21rbln_memcpy_v2h_asyncEmmmPm"

/** rbln::rbln_memcpy_v2v_async(unsigned long src_vaddr, unsigned long dst_vaddr,
 * unsigned long size, unsigned long* handle) */
typedef RBLNRetCode (*rbln_memcpy_v2v_async_fn)(uint64_t src_vaddr, uint64_t dst_vaddr,
                                                uint64_t size, uint64_t *handle);
#define RBLN_SYM_MEMCPY_V2V_ASYNC "_ZN4rbln21rbln_memcpy_v2v_asyncEmmmPm"

/** rbln::rbln_device_synchronize(unsigned int device): drains every pending async copy and
 * stream of the device. */
typedef RBLNRetCode (*rbln_device_synchronize_fn)(uint32_t device);
#define RBLN_SYM_DEVICE_SYNCHRONIZE "_ZN4rbln23rbln_device_synchronizeEj"

/** rbln::rbln_get_torch_device_id_from_vaddr(unsigned long vaddr, unsigned int& device) */
typedef RBLNRetCode (*rbln_get_torch_device_id_from_vaddr_fn)(uint64_t vaddr, uint32_t *device);
#define RBLN_SYM_GET_DEVICE_ID_FROM_VADDR "_ZN4rbln35rbln_get_torch_device_id_from_vaddrEmRj"
