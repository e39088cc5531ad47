// Generated from erpd/ops/policy_spec.py by `python -m erpd.ops.policy_spec --write-header`;
// do not edit (tests/ops/test_policy_spec.py fails when this file and the table differ).
// The integer codes of the policy losses' options and the order of their `stats` output.
#pragma once

#include <cstdint>

namespace erpd {
namespace policy {

enum Method : int64_t {
  kPPO = 0,  // "ppo"
  kSAPO = 1,  // "sapo"
  kCISPO = 2,  // "cispo"
  kGSPO = 3,  // "gspo"
  kReinforce = 4,  // "reinforce"
};
constexpr int64_t kNumMethods = 5;

enum Agg : int64_t {
  kTokenMean = 0,  // "token-mean"
  kSeqMeanTokenMean = 1,  // "seq-mean-token-mean"
  kSeqMeanTokenSum = 2,  // "seq-mean-token-sum"
  kSeqMeanTokenSumNorm = 3,  // "seq-mean-token-sum-norm"
};
constexpr int64_t kNumAggs = 4;

enum KLEstimator : int64_t {
  kK1 = 0,  // "k1"
  kK2 = 1,  // "k2"
  kK3 = 2,  // "k3"
};
constexpr int64_t kNumKLEstimators = 3;

enum Stat : int {
  kInvNorm = 0,  // "inv_norm": 1 / D: the backward scales the saved gradients by grad_output / D
  kPgLoss = 1,  // "pg_loss": the policy term of the loss
  kClipfracLow = 2,  // "clipfrac_low": fraction of valid tokens with A < 0 and r < lo
  kClipfracHigh = 3,  // "clipfrac_high": fraction of valid tokens with A > 0 and r > hi
  kClipfrac = 4,  // "clipfrac": clipfrac_low + clipfrac_high
  kRatioMean = 5,  // "ratio_mean": mean ratio over valid tokens
  kRatioMin = 6,  // "ratio_min": 1 when there is no valid token
  kRatioMax = 7,  // "ratio_max": 1 when there is no valid token
  kApproxKL = 8,  // "approx_kl": mean (r - 1) - log r of the token ratios
  kKLRef = 9,  // "kl_ref": mean KL term to the reference policy
  kEntropy = 10,  // "entropy": mean entropy
  kNumValid = 11,  // "num_valid": number of valid tokens
  kNumStats = 12
};

}  // namespace policy
}  // namespace erpd
