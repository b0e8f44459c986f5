// Early-return helpers for absl::Status / absl::StatusOr (Abseil 20220623 ships none).
#ifndef SPARSEKV_COMMON_STATUS_MACROS_H_
#define SPARSEKV_COMMON_STATUS_MACROS_H_

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define SPARSEKV_CONCAT_INNER_(a, b) a##b
#define SPARSEKV_CONCAT_(a, b) SPARSEKV_CONCAT_INNER_(a, b)

// Returns the status from the enclosing function when `expr` is not OK.
#define SPARSEKV_RETURN_IF_ERROR(expr)           \
  do {                                           \
    const ::absl::Status _sparsekv_st = (expr);  \
    if (!_sparsekv_st.ok()) return _sparsekv_st; \
  } while (0)

// `lhs = value of rexpr` (a StatusOr), or returns its status from the enclosing function.
#define SPARSEKV_ASSIGN_OR_RETURN(lhs, rexpr) \
  SPARSEKV_ASSIGN_OR_RETURN_IMPL_(SPARSEKV_CONCAT_(_sparsekv_or_, __LINE__), lhs, rexpr)
#define SPARSEKV_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, rexpr) \
  auto tmp = (rexpr);                                    \
  if (!tmp.ok()) return tmp.status();                    \
  lhs = std::move(tmp).value()

#endif  // SPARSEKV_COMMON_STATUS_MACROS_H_
