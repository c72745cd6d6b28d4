# lme4 fits with per-factor contrasts, for tests/test_day_one.py.
# Regenerate from the repository root:
#   Rscript tests/reference/contrasts.R > tests/reference/lme4_contrasts.json
suppressMessages({library(lme4); library(jsonlite)})
s <- read.csv("lmmjax/datasets/sleepstudy.csv")
s$g <- factor(letters[s$Days %% 3 + 1])   # a, b, c: crossed with Days
s$h <- factor(letters[s$Days %/% 3 + 1])  # a, b, c, d: blocks of days
cases <- list(
  list(formula = "Reaction ~ g + (1 | Subject)", contrasts = list(g = "sum")),
  list(formula = "Reaction ~ g + (1 | Subject)", contrasts = list(g = "helmert")),
  list(formula = "Reaction ~ h + (1 | Subject)", contrasts = list(h = "poly")),
  list(formula = "Reaction ~ h + (1 | Subject)", contrasts = list(h = "treatment")),
  list(formula = "Reaction ~ Days * g + (Days | Subject)", contrasts = list(g = "sum")),
  list(formula = "Reaction ~ g * h + (1 | Subject)", contrasts = list(g = "helmert", h = "sum"))
)
out <- lapply(cases, function(k) {
  ctr <- lapply(k$contrasts, function(x) paste0("contr.", x))
  m <- lmer(as.formula(k$formula), s, contrasts = ctr)
  list(formula = k$formula, contrasts = k$contrasts, names = names(fixef(m)),
       fixef = unname(fixef(m)), se = unname(sqrt(diag(as.matrix(vcov(m))))),
       objective = REMLcrit(m))
})
cat(toJSON(list(lme4 = as.character(packageVersion("lme4")), cases = out), digits = NA,
           auto_unbox = TRUE, pretty = TRUE))
