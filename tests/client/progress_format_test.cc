#include "client/progress_format.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace mergeguard {
namespace {

TEST(ProgressFormatTest, LineCarriesPhaseStepAndSortedLosses) {
  JobProgress progress{"dam_meta", 3, 10, {{"trigger", 0.25}, {"inner", 1.5}}};
  EXPECT_EQ(FormatProgressLine(2.04, "RUNNING", progress),
            "    2.0s RUNNING   dam_meta 3/10 inner=1.5 trigger=0.25\n");
}

TEST(ProgressFormatTest, NoLosses) {
  EXPECT_EQ(FormatLosses({}), "");
  EXPECT_EQ(FormatLosses({{"loss", 1.0 / 3}}), "loss=0.3333");
}

}  // namespace
}  // namespace mergeguard
