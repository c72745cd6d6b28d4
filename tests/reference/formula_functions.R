# lme4 fits with R formula functions, for tests/test_day_one.py.
# Regenerate from the repository root:
#   Rscript tests/reference/formula_functions.R > tests/reference/lme4_formula_functions.json
suppressMessages({library(lme4); library(jsonlite)})
s <- read.csv("lmmjax/datasets/sleepstudy.csv")
formulas <- c(
  "Reaction ~ poly(Days, 2) + (1 | Subject)",
  "Reaction ~ poly(Days, 2, raw = TRUE) + (1 | Subject)",
  "Reaction ~ scale(Days) + (1 | Subject)",
  "Reaction ~ log(Days + 1) + sqrt(Days) + (1 | Subject)",
  "Reaction ~ factor(Days) + (1 | Subject)",
  "Reaction ~ Days + I(Days^2) + (Days | Subject)"
)
# every 7th response missing (rows 1, 8, ...): poly() and scale() still see every row
s_na <- s
s_na$Reaction[seq(1, nrow(s), by = 7)] <- NA
with_na <- c(
  "Reaction ~ poly(Days, 2) + (1 | Subject)",
  "Reaction ~ scale(Days) + (1 | Subject)"
)
one <- function(f, d, name) {
  m <- lmer(as.formula(f), d)
  list(formula = f, data = name, names = names(fixef(m)), fixef = unname(fixef(m)),
       objective = REMLcrit(m))
}
out <- c(lapply(formulas, one, d = s, name = "sleepstudy"),
         lapply(with_na, one, d = s_na, name = "sleepstudy_na"))
cat(toJSON(list(lme4 = as.character(packageVersion("lme4")), cases = out), digits = NA,
           auto_unbox = TRUE, pretty = TRUE))
